// SHA-256, HMAC-SHA256 (OpenSSL 3), random nonces, constant-time comparison.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fl {

struct Span {
  const uint8_t* data;
  size_t size;
};

std::vector<uint8_t> sha256(const std::vector<Span>& parts);
std::vector<uint8_t> sha256(const std::string& text);
std::string sha256_file_hex(const std::string& path);
std::vector<uint8_t> hmac_sha256(const std::vector<uint8_t>& key, const std::vector<Span>& parts);
bool equal_constant_time(const std::vector<uint8_t>& a, const uint8_t* b, size_t n);
std::string random_hex(size_t n_bytes);

}  // namespace fl
