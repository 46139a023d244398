// Subcommands besides `run`: checks and measurements the tests and `fleetlora bench` drive.
#pragma once

#include <string>
#include <vector>

namespace fl {

int check_vectors(const std::string& folder);                     // protocol/envelope_vectors
int sign_update(const std::vector<std::string>& args);            // an update for the Python decoder
int train_check(const std::vector<std::string>& args);            // parity with ExecuTorchTrainer
int bench(const std::vector<std::string>& args);                  // step time and memory
int plan(const std::vector<std::string>& args);                   // one round's plan, as JSON

}  // namespace fl
