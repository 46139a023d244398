// Tensors as safetensors bytes: a bounded, checked reader (the envelope's rules) and a writer.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fl {

// A float tensor (F32; BF16/F16 are widened on reading, exactly) or an index tensor (I64).
struct Tensor {
  std::string dtype = "F32";  // "F32" or "I64" in memory
  std::vector<int64_t> shape;
  std::vector<float> f;
  std::vector<int64_t> i;

  size_t numel() const;
  static Tensor floats(std::vector<int64_t> shape, std::vector<float> values);
  static Tensor ints(std::vector<int64_t> shape, std::vector<int64_t> values);
};

using TensorMap = std::map<std::string, Tensor>;

// One tensor as a safetensors header declares it.
struct Entry {
  std::string dtype;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;
};

// Parse and check a safetensors blob's header (sizes and offsets bounded by the blob, data back to
// back, no __metadata__ unless allowed). Throws fl::Error("bad_tensors: ...") / ("dtype: ...").
std::map<std::string, Entry> parse_tensor_header(const uint8_t* blob, size_t n, bool allow_metadata = false,
                                                 std::map<std::string, std::string>* metadata = nullptr);
// The tensors of a checked blob (F32/BF16/F16 widened to float, I64 kept).
TensorMap load_tensors(const uint8_t* blob, size_t n, const std::map<std::string, Entry>& entries);
// Read a safetensors file (names, dtypes and data checked; metadata returned when asked).
TensorMap read_safetensors(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);
// F32 / I64 tensors as safetensors bytes, names sorted, optional string metadata.
std::vector<uint8_t> encode_safetensors(const TensorMap& tensors,
                                        const std::map<std::string, std::string>& metadata = {});

}  // namespace fl
