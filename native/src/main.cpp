// fleetlora-client: the device client without Python (native/README.md).
#include <executorch/runtime/platform/platform.h>

#include <iostream>
#include <string>
#include <vector>

#include "client.hpp"
#include "tools.hpp"
#include "util.hpp"

// The runtime's log goes through this (it overrides the weak default, which prints every INFO line
// about CPU detection): errors only, in this client's log format.
extern "C" void et_pal_emit_log_message(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*,
                                        size_t line, const char* message, size_t length) {
  if (level == kError || level == kFatal)
    fl::log_error("executorch: " + std::string(message, length) + " (" + filename + ":" + std::to_string(line) + ")");
}

namespace {
const char* kUsage = R"(usage: fleetlora-client COMMAND [flags]

  run --config client.toml [--local-steps N --batch-size N --lr X --connect-jitter S --state-file P --threads N]
      train each sampled round of the flashed folder's run and publish the update (what run-client.sh does)
  check-vectors DIR
      decode the envelope test vectors (protocol/envelope_vectors) and compare with their verdicts
  sign-update --vectors DIR --out FILE
      write a signed update of the vectors' adapter (the Python decoder checks it)
  train-check --bundle DIR --batches FILE --out FILE [--start FILE --lr X --momentum X --weight-decay X
              --heads 0,2 --base-delta FILE --threads N]
      train the bundle's program on the given batches; losses and adapter to FILE (parity tests)
  bench --bundle DIR --batches FILE [--warmup N --threads N]
      median step time and peak resident memory of the runtime training the bundle's program
  plan --plan plan.json --bundle DIR --client ID --round N --time-left S [--local-steps N --batch-size N]
      the round's plan (steps, batch, Ravan heads) as this client computes it, as JSON
  version

examples:
  ./fleetlora-client run --config client.toml
  ./fleetlora-client check-vectors protocol/envelope_vectors
)";
}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  std::string command = args[0];
  std::vector<std::string> rest(args.begin() + 1, args.end());
  try {
    if (command == "run") {
      if (rest.size() < 2 || rest[0] != "--config") throw fl::Error("run needs --config client.toml first");
      return fl::run_client(rest[1], std::vector<std::string>(rest.begin() + 2, rest.end()));
    }
    if (command == "check-vectors") {
      if (rest.size() != 1) throw fl::Error("check-vectors needs the vectors folder");
      return fl::check_vectors(rest[0]);
    }
    if (command == "sign-update") return fl::sign_update(rest);
    if (command == "train-check") return fl::train_check(rest);
    if (command == "bench") return fl::bench(rest);
    if (command == "plan") return fl::plan(rest);
    if (command == "version") {
      std::cout << "fleetlora-client (envelope schema 2)" << std::endl;
      return 0;
    }
    std::cerr << "unknown command " << command << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    fl::log_error(e.what());
    return 1;
  }
}
