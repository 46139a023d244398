#include "crypto.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <fstream>
#include <memory>

#include "util.hpp"

namespace fl {

std::vector<uint8_t> sha256(const std::vector<Span>& parts) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL: no SHA-256");
  for (const auto& p : parts)
    if (p.size && EVP_DigestUpdate(ctx.get(), p.data, p.size) != 1) throw Error("OpenSSL: SHA-256 failed");
  std::vector<uint8_t> out(32);
  unsigned int n = 0;
  if (EVP_DigestFinal_ex(ctx.get(), out.data(), &n) != 1 || n != 32) throw Error("OpenSSL: SHA-256 failed");
  return out;
}

std::vector<uint8_t> sha256(const std::string& text) {
  return sha256({Span{reinterpret_cast<const uint8_t*>(text.data()), text.size()}});
}

std::string sha256_file_hex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount()));
  }
  uint8_t out[32];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx.get(), out, &n);
  return to_hex(out, 32);
}

std::vector<uint8_t> hmac_sha256(const std::vector<uint8_t>& key, const std::vector<Span>& parts) {
  std::unique_ptr<EVP_MAC, decltype(&EVP_MAC_free)> mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr), EVP_MAC_free);
  if (!mac) throw Error("OpenSSL: no HMAC");
  std::unique_ptr<EVP_MAC_CTX, decltype(&EVP_MAC_CTX_free)> ctx(EVP_MAC_CTX_new(mac.get()), EVP_MAC_CTX_free);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0), OSSL_PARAM_END};
  if (!ctx || EVP_MAC_init(ctx.get(), key.data(), key.size(), params) != 1) throw Error("OpenSSL: HMAC init failed");
  for (const auto& p : parts)
    if (p.size && EVP_MAC_update(ctx.get(), p.data, p.size) != 1) throw Error("OpenSSL: HMAC failed");
  std::vector<uint8_t> out(32);
  size_t n = 0;
  if (EVP_MAC_final(ctx.get(), out.data(), &n, out.size()) != 1 || n != 32) throw Error("OpenSSL: HMAC failed");
  return out;
}

bool equal_constant_time(const std::vector<uint8_t>& a, const uint8_t* b, size_t n) {
  return a.size() == n && CRYPTO_memcmp(a.data(), b, n) == 0;
}

std::string random_hex(size_t n_bytes) {
  std::vector<uint8_t> buf(n_bytes);
  if (RAND_bytes(buf.data(), static_cast<int>(n_bytes)) != 1) throw Error("OpenSSL: no random bytes");
  return to_hex(buf);
}

}  // namespace fl
