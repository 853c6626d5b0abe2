#!/usr/bin/env bash
# On a lent GPU machine (Python 3.12 with torch, no network), with .gpu/ carried from
# bench/gpu_triton_pack.sh: unpack, check the pieces the run relies on, run bench/gpu_triton.py.
# Output: $OUT (or ./gpu-out) gets gpu_triton.json, log.txt and the tritonserver log(s).
# Extra arguments go to bench/gpu_triton.py (they override the defaults below).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT" /tmp/gt-site /tmp/gt-stubsite /tmp/gt-pylib /tmp/gt-tok
for part in site:/tmp/gt-site stubsite:/tmp/gt-stubsite pylib:/tmp/gt-pylib tokenizer:/tmp/gt-tok; do
  tar -xJf ".gpu/${part%%:*}.tar.xz" -C "${part#*:}" || exit 3
done
export PYTHONPATH="/tmp/gt-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# the 3.12 stub links libpython3.12.so.1.0: the carried one only where the machine has none
if ! ldconfig -p | grep -q 'libpython3.12.so.1.0' &&
  ! python3 -c 'import sysconfig, os, sys; d = sysconfig.get_config_var("LIBDIR"); sys.exit(not os.path.exists(os.path.join(d, "libpython3.12.so.1.0")))'; then
  export LD_LIBRARY_PATH="/tmp/gt-pylib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "using the carried libpython3.12.so.1.0"
fi
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv
python3 -c 'import torch, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "numpy", numpy.__version__)'
PYTHONUNBUFFERED=1 python3 bench/gpu_triton.py --tokenizer /tmp/gt-tok/tokenizer \
  --stub-path /tmp/gt-stubsite --concurrency 1,8,32,64 --budget-s 330 --timeout 150 \
  --warmup 4 --parity 2 --work-dir /tmp/gt --json "$OUT/gpu_triton.json" "$@" 2>&1 |
  grep --line-buffered -v 'it/s\]' | tee "$OUT/log.txt"
rc=$?
for log in /tmp/gt/server*/tritonserver.log; do
  [ -f "$log" ] && cp "$log" "$OUT/$(basename "$(dirname "$log")").log"
done
exit $rc
