#include "safetensors.hpp"

#include <cmath>
#include <cstring>

#include "strict_json.hpp"
#include "util.hpp"

namespace fl {

namespace {
constexpr size_t kMaxHeader = 1 << 20;  // bytes of JSON header, as the Python reader bounds it
constexpr size_t kMaxName = 512;
constexpr size_t kMaxDims = 4;

float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float f16_to_float(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float value;
  if (exp == 0) {
    value = std::ldexp(static_cast<float>(mant), -24);  // subnormal (or zero): exact in float
  } else if (exp == 31) {
    value = mant ? NAN : INFINITY;
  } else {
    value = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  }
  return sign ? -value : value;
}

size_t itemsize(const std::string& dtype) {
  if (dtype == "F32") return 4;
  if (dtype == "BF16" || dtype == "F16") return 2;
  if (dtype == "I64") return 8;
  return 0;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int k = 7; k >= 0; --k) v = (v << 8) | p[k];
  return v;
}
}  // namespace

size_t Tensor::numel() const {
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  return n;
}

Tensor Tensor::floats(std::vector<int64_t> shape, std::vector<float> values) {
  Tensor t;
  t.shape = std::move(shape);
  t.f = std::move(values);
  return t;
}

Tensor Tensor::ints(std::vector<int64_t> shape, std::vector<int64_t> values) {
  Tensor t;
  t.dtype = "I64";
  t.shape = std::move(shape);
  t.i = std::move(values);
  return t;
}

std::map<std::string, Entry> parse_tensor_header(const uint8_t* blob, size_t n, bool allow_metadata,
                                                 std::map<std::string, std::string>* metadata) {
  if (n < 8) throw Refused("bad_tensors", "safetensors blob of " + std::to_string(n) + " bytes has no header");
  uint64_t len = read_le64(blob);
  if (len > kMaxHeader || 8 + len > n)
    throw Refused("bad_tensors", "safetensors header length " + std::to_string(len) + " exceeds the blob or limit");
  json raw;
  try {
    raw = parse_strict_json(reinterpret_cast<const char*>(blob) + 8, reinterpret_cast<const char*>(blob) + 8 + len);
  } catch (const Error& e) {
    throw Refused("bad_tensors", std::string("safetensors header is not valid JSON: ") + e.what());
  }
  if (!raw.is_object()) throw Refused("bad_tensors", "safetensors header is not a JSON object");
  std::map<std::string, Entry> entries;
  for (auto& [name, info] : raw.items()) {
    if (name == "__metadata__" && allow_metadata && info.is_object()) {
      for (auto& [k, v] : info.items())
        if (metadata && v.is_string()) (*metadata)[k] = v.get<std::string>();
      continue;
    }
    if (name.empty() || name.size() > kMaxName || name == "__metadata__")
      throw Refused("bad_tensors", "tensor name " + name.substr(0, 40) + " not allowed");
    if (!info.is_object() || info.size() != 3 || !info.contains("dtype") || !info.contains("shape") ||
        !info.contains("data_offsets"))
      throw Refused("bad_tensors", name + ": entry must have dtype, shape, data_offsets");
    const auto &dtype = info["dtype"], &shape = info["shape"], &offsets = info["data_offsets"];
    if (!dtype.is_string() || !shape.is_array() || !offsets.is_array())
      throw Refused("bad_tensors", name + ": malformed entry");
    Entry e;
    e.dtype = dtype.get<std::string>();
    if (shape.size() > kMaxDims) throw Refused("bad_tensors", name + ": more than 4 dimensions");
    for (const auto& d : shape) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > (int64_t(1) << 40))
        throw Refused("bad_tensors", name + ": a shape entry is not a size");
      e.shape.push_back(d.get<int64_t>());
    }
    if (offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      throw Refused("bad_tensors", name + ": bad data_offsets");
    e.begin = offsets[0].get<uint64_t>();
    e.end = offsets[1].get<uint64_t>();
    if (e.begin > e.end) throw Refused("bad_tensors", name + ": bad data_offsets");
    entries[name] = e;
  }
  // The data must be exactly the tensors, back to back (what safetensors itself writes and requires).
  std::vector<std::pair<size_t, size_t>> spans;
  for (auto& [name, e] : entries) spans.emplace_back(e.begin, e.end);
  std::sort(spans.begin(), spans.end());
  size_t pos = 0;
  for (auto& [b, e] : spans) {
    if (b != pos) throw Refused("bad_tensors", "tensor data overlaps or leaves gaps");
    pos = e;
  }
  if (pos != n - 8 - len)
    throw Refused("bad_tensors", "tensor data covers " + std::to_string(pos) + " of " + std::to_string(n - 8 - len) + " bytes");
  for (auto& [name, e] : entries) {
    size_t size = itemsize(e.dtype);
    if (!size) throw Refused("dtype", name + ": dtype " + e.dtype.substr(0, 10) + " not in [BF16, F16, F32, I64]");
    size_t count = 1;
    for (auto d : e.shape) count *= static_cast<size_t>(d);
    if (count * size != e.end - e.begin)
      throw Refused("bad_tensors", name + ": " + std::to_string(e.end - e.begin) + " bytes for its shape");
  }
  return entries;
}

TensorMap load_tensors(const uint8_t* blob, size_t n, const std::map<std::string, Entry>& entries) {
  size_t start = 8 + read_le64(blob);
  (void)n;
  TensorMap out;
  for (const auto& [name, e] : entries) {
    const uint8_t* p = blob + start + e.begin;
    Tensor t;
    t.shape = e.shape;
    size_t count = (e.end - e.begin) / itemsize(e.dtype);
    if (e.dtype == "I64") {
      t.dtype = "I64";
      t.i.resize(count);
      for (size_t k = 0; k < count; ++k) t.i[k] = static_cast<int64_t>(read_le64(p + 8 * k));
    } else if (e.dtype == "F32") {
      t.f.resize(count);
      std::memcpy(t.f.data(), p, 4 * count);  // little-endian hosts only (x86-64, ARM64)
    } else {
      t.f.resize(count);
      for (size_t k = 0; k < count; ++k) {
        uint16_t h = static_cast<uint16_t>(p[2 * k] | (p[2 * k + 1] << 8));
        t.f[k] = e.dtype == "BF16" ? bf16_to_float(h) : f16_to_float(h);
      }
    }
    out[name] = std::move(t);
  }
  return out;
}

TensorMap read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata) {
  auto bytes = read_file(path);
  try {
    auto entries = parse_tensor_header(bytes.data(), bytes.size(), true, metadata);
    return load_tensors(bytes.data(), bytes.size(), entries);
  } catch (const Refused& e) {
    throw Error(path + " is not a usable safetensors file: " + e.what());
  }
}

std::vector<uint8_t> encode_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t pos = 0;
  for (const auto& [name, t] : tensors) {
    size_t bytes = t.dtype == "I64" ? 8 * t.i.size() : 4 * t.f.size();
    if (t.numel() != (t.dtype == "I64" ? t.i.size() : t.f.size()))
      throw Error(name + ": shape and values disagree");
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {pos, pos + bytes}}};
    pos += bytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8) text += ' ';  // safetensors aligns the data to 8 bytes
  std::vector<uint8_t> out(8 + text.size() + pos);
  uint64_t len = text.size();
  for (int k = 0; k < 8; ++k) out[k] = static_cast<uint8_t>(len >> (8 * k));
  std::memcpy(out.data() + 8, text.data(), text.size());
  uint8_t* data = out.data() + 8 + text.size();
  for (const auto& [name, t] : tensors) {  // std::map: the same sorted order as the header offsets
    size_t bytes = t.dtype == "I64" ? 8 * t.i.size() : 4 * t.f.size();
    std::memcpy(data, t.dtype == "I64" ? static_cast<const void*>(t.i.data()) : static_cast<const void*>(t.f.data()), bytes);
    data += bytes;
  }
  return out;
}

}  // namespace fl
