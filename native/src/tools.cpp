#include "tools.hpp"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <sstream>

#include "bundle.hpp"
#include "crypto.hpp"
#include "envelope.hpp"
#include "plan.hpp"
#include "trainer.hpp"
#include "util.hpp"

namespace fl {

namespace {

std::map<std::string, std::string> parse_flags(const std::vector<std::string>& args, const std::vector<std::string>& known) {
  std::map<std::string, std::string> out;
  for (size_t i = 0; i < args.size(); i += 2) {
    std::string name = args[i];
    if (name.rfind("--", 0) != 0 || i + 1 >= args.size()) throw Error("expected --name value pairs, got " + name);
    name = name.substr(2);
    if (std::find(known.begin(), known.end(), name) == known.end()) throw Error("unknown flag --" + name);
    out[name] = args[i + 1];
  }
  return out;
}

std::string need(const std::map<std::string, std::string>& f, const std::string& name) {
  auto it = f.find(name);
  if (it == f.end()) throw Error("--" + name + " is required");
  return it->second;
}

// input_ids / attention_mask (S, n, seq_len) and labels (S, n): S batches.
std::vector<Batch> read_batches(const std::string& path) {
  TensorMap t = read_safetensors(path);
  for (const char* name : {"input_ids", "attention_mask", "labels"})
    if (!t.count(name) || t[name].dtype != "I64") throw Error(path + ": needs an I64 tensor " + name);
  const auto &ids = t["input_ids"], &mask = t["attention_mask"], &labels = t["labels"];
  if (ids.shape.size() != 3 || mask.shape != ids.shape || labels.shape != std::vector<int64_t>{ids.shape[0], ids.shape[1]})
    throw Error(path + ": input_ids and attention_mask must be (steps, n, seq_len), labels (steps, n)");
  std::vector<Batch> out;
  int64_t n = ids.shape[1], per = ids.shape[1] * ids.shape[2];
  for (int64_t s = 0; s < ids.shape[0]; ++s) {
    Batch b;
    b.n = n;
    b.input_ids.assign(ids.i.begin() + s * per, ids.i.begin() + (s + 1) * per);
    b.attention_mask.assign(mask.i.begin() + s * per, mask.i.begin() + (s + 1) * per);
    b.labels.assign(labels.i.begin() + s * n, labels.i.begin() + (s + 1) * n);
    out.push_back(std::move(b));
  }
  return out;
}

SgdConfig sgd_from(const std::map<std::string, std::string>& f) {
  SgdConfig sgd;
  if (f.count("lr")) sgd.lr = std::stod(f.at("lr"));
  if (f.count("momentum")) sgd.momentum = std::stod(f.at("momentum"));
  if (f.count("weight-decay")) sgd.weight_decay = std::stod(f.at("weight-decay"));
  return sgd;
}

bool same_header(const json& want, const json& got) {
  for (auto& [k, v] : want.items()) {
    if (!got.contains(k)) return false;
    if (v.is_number() && got[k].is_number()) {
      if (v.get<double>() != got[k].get<double>()) return false;
    } else if (v != got[k]) {
      return false;
    }
  }
  return true;
}

}  // namespace

int check_vectors(const std::string& folder) {
  json index = parse_strict_json(read_text(join_path(folder, "vectors.json")));
  if (index.at("schema") != kSchemaVersion) throw Error(folder + ": vectors of schema " + index.at("schema").dump());
  Receiver base;
  base.run = index["receiver"]["run"];
  base.spec_digest = index["spec"];
  base.spec_json = index["spec_json"];
  for (auto& [k, v] : index["template"].items()) base.shapes[k] = v.get<std::vector<int64_t>>();
  const std::string client = index["receiver"]["client"];
  const auto rounds = index["receiver"]["rounds"].get<std::vector<int64_t>>();
  int mismatched = 0;
  for (const auto& c : index["cases"]) {
    Receiver r = base;
    if (!c["key"].is_null()) r.key = from_hex(index["keys"][c["key"].get<std::string>()], "vectors.json");
    auto payload = read_file(join_path(folder, c["file"]));
    std::string verdict = "ok", detail;
    try {
      json header;
      TensorMap tensors;
      if (c["kind"] == "update") {
        auto d = decode_update(payload, r, client, rounds);
        const auto& h = d.header;
        header = {{"kind", "update"}, {"run", h.run}, {"round", h.round}, {"client", h.client}, {"method", h.method},
                  {"spec", h.spec}, {"num_examples", h.num_examples}, {"local_steps", h.local_steps},
                  {"compute_s", h.compute_s}, {"msg_id", h.msg_id}, {"sent_at", h.sent_at},
                  {"auth", h.is_signed ? "hmac-sha256" : "sha256"}};
        header["rank"] = h.rank ? json(*h.rank) : json(nullptr);
        header["heads"] = h.heads ? json(*h.heads) : json(nullptr);
        tensors = d.tensors;
      } else {
        auto d = decode_global(payload, r, 0);
        const auto& h = d.header;
        header = {{"kind", "global"}, {"run", h.run}, {"round", h.round}, {"method", h.method}, {"spec", h.spec},
                  {"spec_json", h.spec_json}, {"deadline", h.deadline}, {"final", h.final}, {"msg_id", h.msg_id},
                  {"sent_at", h.sent_at}, {"keep_local", h.keep_local}, {"auth", h.is_signed ? "hmac-sha256" : "sha256"}};
        header["rank"] = h.rank ? json(*h.rank) : json(nullptr);
        header["clients"] = h.clients ? json(*h.clients) : json(nullptr);
        header["sample_fraction"] = h.sample_fraction ? json(*h.sample_fraction) : json(nullptr);
        tensors = d.tensors;
        if (c.contains("sampled"))
          for (auto& [who, want] : c["sampled"].items())
            if (is_sampled(h, who) != want.get<bool>()) detail += " sampled(" + who + ") differs";
      }
      if (c.contains("header") && !same_header(c["header"], header)) detail += " header differs: " + header.dump();
      if (c.contains("tensors")) {
        if (tensors.size() != c["tensors"].size()) detail += " tensor names differ";
        for (auto& [name, want] : c["tensors"].items()) {
          if (!tensors.count(name)) continue;
          const Tensor& t = tensors[name];
          if (t.shape != want["shape"].get<std::vector<int64_t>>() || t.f != want["values"].get<std::vector<float>>())
            detail += " " + name + " differs";
        }
      }
    } catch (const Refused& e) {
      verdict = e.reason;
      detail = e.what();
    }
    bool ok = verdict == c["expect"] && (verdict != "ok" || detail.empty());
    if (!ok) ++mismatched;
    std::cout << (ok ? "ok " : "MISMATCH ") << c["file"].get<std::string>() << " key="
              << (c["key"].is_null() ? "none" : c["key"].get<std::string>()) << " expect=" << c["expect"].get<std::string>()
              << " got=" << verdict << (ok || detail.empty() ? "" : " (" + detail + ")") << std::endl;
  }
  std::cout << "vectors: " << index["cases"].size() << " checked, " << mismatched << " mismatched" << std::endl;
  return mismatched ? 1 : 0;
}

int sign_update(const std::vector<std::string>& args) {
  auto f = parse_flags(args, {"vectors", "out"});
  std::string folder = need(f, "vectors");
  json index = parse_strict_json(read_text(join_path(folder, "vectors.json")));
  TensorMap tensors;
  float value = 0.125f;
  for (auto& [name, shape] : index["template"].items()) {
    Tensor t;
    t.shape = shape.get<std::vector<int64_t>>();
    for (size_t k = 0; k < t.numel(); ++k, value += 0.25f) t.f.push_back(value);
    tensors[name] = t;
  }
  UpdateHeader h;
  h.run = index["receiver"]["run"];
  h.client = index["receiver"]["client"];
  h.round = index["receiver"]["rounds"][0];
  h.method = "fedit";
  h.spec = index["spec"];
  h.num_examples = 40;
  h.local_steps = 5;
  h.compute_s = 151.70637073051861;  // nlohmann prints 17 digits, Python's repr 16: the MAC must not care
  h.rank = index["spec_json"]["rank"].get<int64_t>();
  h.msg_id = random_hex(16);
  h.sent_at = unix_time();
  auto payload = encode_update(h, tensors, from_hex(index["keys"]["device"], "vectors.json"));
  write_atomically(need(f, "out"), payload);
  std::cout << "wrote a signed update of " << payload.size() << " bytes" << std::endl;
  return 0;
}

int train_check(const std::vector<std::string>& args) {
  auto f = parse_flags(args, {"bundle", "batches", "out", "start", "lr", "momentum", "weight-decay", "heads", "threads", "base-delta"});
  Bundle b = load_bundle(need(f, "bundle"));
  if (f.count("threads")) Trainer::set_threads(static_cast<unsigned>(std::stoi(f["threads"])));
  Trainer trainer(b.train_pte(), b.adapter_ptd(), b.seq_len, b.batch_min, b.batch_max, b.base_delta);
  if (f.count("start")) trainer.set_trainable(read_safetensors(f["start"]));
  if (f.count("heads")) {
    std::vector<int64_t> heads;
    std::stringstream ss(f["heads"]);
    for (std::string item; std::getline(ss, item, ',');) heads.push_back(std::stoll(item));
    trainer.select_heads(heads);
  }
  if (f.count("base-delta")) {
    std::map<std::string, std::vector<float>> dense;
    for (auto& [layer, t] : read_safetensors(f["base-delta"])) dense[layer] = t.f;
    trainer.set_base_delta(dense);
  }
  auto batches = read_batches(need(f, "batches"));
  TrainResult r = trainer.train(batches, static_cast<int>(batches.size()), sgd_from(f));
  TensorMap out = trainer.get_trainable();
  out["losses"] = Tensor::floats({static_cast<int64_t>(r.losses.size())}, r.losses);
  write_atomically(need(f, "out"), encode_safetensors(out));
  std::cout << "trained " << r.steps << " steps in " << r.seconds << " s" << std::endl;
  return 0;
}

int plan(const std::vector<std::string>& args) {
  auto f = parse_flags(args, {"plan", "bundle", "client", "round", "time-left", "local-steps", "batch-size"});
  Bundle b = load_bundle(need(f, "bundle"));
  int steps = f.count("local-steps") ? std::stoi(f["local-steps"]) : 0;
  int batch = f.count("batch-size") ? std::stoi(f["batch-size"]) : static_cast<int>(b.batch_max);
  Planner planner(need(f, "plan"), b, need(f, "client"), steps, batch);
  RoundPlan p = planner.plan(std::stoll(need(f, "round")), std::stod(need(f, "time-left")), 0.0);
  json out = {{"local_steps", p.local_steps}, {"batch_size", p.batch_size}};
  out["heads"] = p.heads ? json(*p.heads) : json(nullptr);
  std::cout << out.dump() << std::endl;
  return 0;
}

int bench(const std::vector<std::string>& args) {
  auto f = parse_flags(args, {"bundle", "batches", "warmup", "threads", "lr", "momentum"});
  Bundle b = load_bundle(need(f, "bundle"));
  Trainer::set_threads(static_cast<unsigned>(f.count("threads") ? std::stoi(f["threads"]) : 1));
  double t0 = monotonic_time();
  Trainer trainer(b.train_pte(), b.adapter_ptd(), b.seq_len, b.batch_min, b.batch_max, b.base_delta);
  double load_s = monotonic_time() - t0;
  auto batches = read_batches(need(f, "batches"));
  int warmup = f.count("warmup") ? std::stoi(f["warmup"]) : 3;
  SgdConfig sgd = sgd_from(f);
  std::vector<double> ms;
  for (int i = 0; i < warmup + static_cast<int>(batches.size()); ++i) {
    const Batch& batch = batches[static_cast<size_t>(i) % batches.size()];
    double s = monotonic_time();
    trainer.train({batch}, 1, sgd);  // a fresh optimizer per call, as the Python bench's trainers
    if (i >= warmup) ms.push_back(1000 * (monotonic_time() - s));
  }
  std::sort(ms.begin(), ms.end());
  double median = ms.size() % 2 ? ms[ms.size() / 2] : (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]) / 2;
  std::cout << "native: step_ms=" << median << " load_s=" << load_s << " rss_mb=" << peak_rss_kb() / 1024.0 << std::endl;
  return 0;
}

}  // namespace fl
