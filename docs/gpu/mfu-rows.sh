#!/bin/bash
# The lent call of 2026-11-30 (H200): plain-CFG MFU rows with the fused kernels against the same rows without.
# Run from the repo root on the GPU machine with .whl/ carried (diffusers, pydantic and their small deps:
# see run-on-device.sh for the pip download line; Ray is not needed here). SIZE=tiny runs it on a CPU.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SIZE=${SIZE:-full}
OUT=${OUT:-/tmp/mfu-out}; mkdir -p $OUT
if [ -d .whl ] && [ "$SIZE" = full ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
echo "setup $(( $(date +%s) - T0 )) s"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
N=0
row() {  # row TIMEOUT_S bench-args...
  local t=$1; shift
  timeout $t python3 -m factory.cli bench --size $SIZE --guidance none --compile --warmup 1 "$@" 2>$OUT/err-$N.log \
    | grep '^{"backbone"' | tee -a $OUT/rows.jsonl | python3 -c "
import sys, json
for r in map(json.loads, sys.stdin):
    print('ROW', r['backbone'], 'batch', r['batch'], r['speedups'], 'mfu', r.get('mfu'), 'img/s', r['img_per_s'],
          'warmup_s', r.get('warmup_s'), 'build_s', r['build_s'], 'peak', r.get('peak_mem_gib'))"
  echo "row $N rc=$? t=$(( $(date +%s) - T0 )) s"; N=$((N+1))
}
DIT="--backbone dit-xl-2 --batch 64 --steps 50 --cfg-scale 4.0"
SD="--backbone sd15 --batch 32 --steps 25 --cfg-scale 7.5"
FAST="--fuse-projections --channels-last --compile-decoder"
row 130 $DIT $FAST
row 150 $SD $FAST
row 90 $DIT
row 110 $SD
row 150 $DIT $FAST --inductor-tuning
row 130 $SD --channels-last --compile-decoder
echo "total $(( $(date +%s) - T0 )) s"
