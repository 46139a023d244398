#!/usr/bin/env bash
# Rerun the numerical tests (`-m "numerical and not slow"`) under every ATen CPU capability this machine
# supports below its best, so that tolerances tuned to one code path (AVX-512 here, AVX2 or plain SSE
# on another machine) fail here too. MKL is held to the same instruction set. `scripts/test.sh` calls
# this after the main run; extra pytest arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)
has() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }
levels=(default)  # ATen's scalar-vector baseline runs everywhere; MKL's matching floor is SSE4.2
best=default
if has avx2 fma; then best=avx2; fi
if has avx512f avx512bw avx512vl avx512dq; then best=avx512; fi
case "$best" in
  avx512) levels=(default avx2) ;;
  avx2) levels=(default) ;;
  default)
    echo "numerical tests: this CPU offers no ATen capability above default (flags:${flags:0:60}...); nothing lower to rerun"
    exit 0
    ;;
esac
declare -A mkl=([default]=SSE4_2 [avx2]=AVX2 [avx512]=AVX512)
echo "numerical tests: this CPU's best ATen capability is $best; rerunning under: ${levels[*]}"
for level in "${levels[@]}"; do
  echo "== ATEN_CPU_CAPABILITY=$level MKL_ENABLE_INSTRUCTIONS=${mkl[$level]} pytest -m 'numerical and not slow'"
  export ATEN_CPU_CAPABILITY=$level MKL_ENABLE_INSTRUCTIONS=${mkl[$level]}
  .venv/bin/python -c "import torch; print('torch runs', torch.backends.cpu.get_cpu_capability())"
  .venv/bin/python -m pytest -q -p no:cacheprovider -m "numerical and not slow" "$@"
done
