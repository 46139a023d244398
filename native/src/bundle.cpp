#include "bundle.hpp"

#include <sys/stat.h>

#include "crypto.hpp"
#include "strict_json.hpp"
#include "util.hpp"

namespace fl {

std::string Bundle::train_pte() const { return join_path(folder, "train.pte"); }
std::string Bundle::adapter_ptd() const { return join_path(folder, "adapter.ptd"); }

Bundle load_bundle(const std::string& folder) {
  if (!dir_exists(folder)) throw Error("bundle folder not found: " + folder);
  std::string manifest_path = join_path(folder, "manifest.json");
  if (!file_exists(manifest_path)) throw Error(folder + ": no manifest.json (not a bundle folder?)");
  json files;
  try {
    files = parse_strict_json(read_text(manifest_path)).at("files");
  } catch (const std::exception& e) {
    throw Error(manifest_path + " is malformed: " + e.what());
  }
  for (const char* name : {"train.pte", "adapter.ptd", "infer.pte", "adapter_spec.json", "bundle.json"})
    if (!files.contains(name)) throw Error(manifest_path + " does not list " + name);
  for (auto& [name, entry] : files.items()) {
    if (name.find('/') != std::string::npos) throw Error(manifest_path + ": bad file name " + name);
    std::string path = join_path(folder, name);
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) throw Error(folder + ": " + name + " is listed in the manifest but missing");
    if (!entry.contains("size") || !entry["size"].is_number_integer() || entry["size"].get<int64_t>() != st.st_size)
      throw Error(folder + ": " + name + " has " + std::to_string(st.st_size) + " bytes, the manifest says " +
                  (entry.contains("size") ? entry["size"].dump() : "nothing"));
    if (!entry.contains("sha256") || sha256_file_hex(path) != entry["sha256"])
      throw Error(folder + ": " + name + " does not match its sha256 in the manifest (altered?)");
  }
  Bundle b;
  b.folder = folder;
  try {
    json info = parse_strict_json(read_text(join_path(folder, "bundle.json")));
    if (info.at("format") != 1) throw Error("format " + info.at("format").dump() + " is not the supported 1");
    b.model = info.at("model");
    b.num_classes = info.at("num_classes");
    b.seq_len = info.at("seq_len");
    b.batch_min = info.at("batch_min");
    b.batch_max = info.at("batch_max");
    b.xnnpack = info.value("xnnpack", false);
    for (auto& [name, shape] : info.at("trainable").items()) b.trainable[name] = shape.get<std::vector<int64_t>>();
    // The program's base-delta inputs in its input order (train_inputs), shaped by base_delta.
    json deltas = info.value("base_delta", json::object());
    for (const auto& input : info.at("train_inputs")) {
      std::string n = input.get<std::string>();
      if (!ends_with(n, ".base_delta")) continue;
      std::string layer = n.substr(0, n.size() - 11);
      b.base_delta.emplace_back(layer, deltas.at(layer).get<std::vector<int64_t>>());
    }
  } catch (const Error& e) {
    throw Error(join_path(folder, "bundle.json") + ": " + e.what());
  } catch (const std::exception& e) {
    throw Error(join_path(folder, "bundle.json") + " is malformed: " + e.what());
  }
  if (b.seq_len < 1 || b.batch_min < 1 || b.batch_max < b.batch_min)
    throw Error(join_path(folder, "bundle.json") + ": bad seq_len or batch range");
  std::string spec_text = read_text(join_path(folder, "adapter_spec.json"));
  while (!spec_text.empty() && (spec_text.back() == '\n' || spec_text.back() == '\r')) spec_text.pop_back();
  try {
    b.spec_json = parse_strict_json(spec_text);
    b.family = b.spec_json.at("family");
    b.rank = b.spec_json.at("rank");
    b.heads = b.spec_json.at("heads");
  } catch (const std::exception& e) {
    throw Error(join_path(folder, "adapter_spec.json") + " is malformed: " + e.what());
  }
  // export.bundle writes the spec's canonical JSON (AdapterSpec.to_json) plus a newline, and the
  // manifest vouches for it: its digest is the spec's digest.
  b.spec_digest = to_hex(sha256(spec_text)).substr(0, 16);
  return b;
}

}  // namespace fl
