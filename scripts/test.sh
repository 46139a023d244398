#!/usr/bin/env bash
# Set up (if needed), lint, type-check and run the test suite. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Tests marked slow (the real MiniLM exported to ExecuTorch with XNNPACK, full-size drills) take many
# minutes on 2 cores: they run when FLEETLORA_SLOW=1, e.g. `FLEETLORA_SLOW=1 bash scripts/test.sh`.
# --durations=15: the slowest tests are printed every run, so the suite's cost stays visible.
if [ "${FLEETLORA_SLOW:-0}" = "1" ]; then
  .venv/bin/python -m pytest -q --durations=15 "$@"
else
  .venv/bin/python -m pytest -q --durations=15 -m "not slow" "$@"
fi
# The numerical tests again under the CPU code paths below this machine's best (AVX2, plain SSE): a
# tolerance must hold on any CPU, not only on the one CI runs on.
bash scripts/test_cpu_levels.sh "$@"
