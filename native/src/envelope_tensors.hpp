// The tensor half of an envelope (protocol/wire_tensors.py): a blob's tensors checked against the
// template (dtypes, names, shapes for the header's rank and heads, a global's base delta), then their
// values (finite floats, head indices equal to the header's).
#pragma once

#include <optional>
#include <vector>

#include "envelope.hpp"

namespace fl {

// fl::Refused with the envelope's reason for anything not exactly right.
TensorMap checked_tensors(const uint8_t* blob, size_t n, const Template& tmpl, const std::optional<int64_t>& rank,
                          const std::optional<std::vector<int64_t>>& heads, bool allow_base_delta);

}  // namespace fl
