// Small shared pieces: the error type, logging, files (atomic writes), hex, clocks.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fl {

// Bad input or a failed operation, with a message that names the file, device or value.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A refused payload: `reason` is one of the envelope's reasons (protocol/ENVELOPE.md), what() is
// "<reason>: <message>" as the Python decoder words it.
struct Refused : Error {
  std::string reason;
  Refused(const std::string& reason_, const std::string& message) : Error(reason_ + ": " + message), reason(reason_) {}
};

// One line on stderr: "<UTC time> <level> <message>" (the operator's log; never a secret in it).
void log_info(const std::string& message);
void log_warn(const std::string& message);
void log_error(const std::string& message);

std::vector<uint8_t> read_file(const std::string& path);
std::string read_text(const std::string& path);
bool file_exists(const std::string& path);
bool dir_exists(const std::string& path);
void make_dirs(const std::string& path);
void remove_file(const std::string& path);
// Write to "<dir>/.<name>.tmp", fsync, rename over path: a crash leaves the old or the new file.
void write_atomically(const std::string& path, const std::vector<uint8_t>& data);
void write_atomically(const std::string& path, const std::string& text);
std::string join_path(const std::string& dir, const std::string& name);
std::string dirname_of(const std::string& path);

std::string to_hex(const uint8_t* data, size_t n);
std::string to_hex(const std::vector<uint8_t>& data);
std::vector<uint8_t> from_hex(const std::string& text, const std::string& source);

double unix_time();       // wall clock, seconds
double monotonic_time();  // for durations
long peak_rss_kb();       // VmHWM of this process

}  // namespace fl
