#!/bin/bash
# Prepared for the next lent GPU call (H100/H200), in priority order, ~560 s: what issue 10 still owes.
# 1. SD 1.5's per-step profile at the measured-best setting (39.99 % MFU): where the last point goes.
# 2. The split of the 2026-11-30 switches on SD 1.5 and DiT-XL/2 (which of fused / NHWC / decoder compile pays).
# 3. The suite with the CUDA defaults, eager, as far as the budget goes (guided rows with the switches).
# Run from the repo root with .whl/ carried (see run-on-device.sh); SIZE=tiny runs it on a CPU.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SIZE=${SIZE:-full}
OUT=${OUT:-/tmp/next-out}; mkdir -p $OUT
if [ -d .whl ] && [ "$SIZE" = full ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
N=0
row() {  # row TIMEOUT_S bench-args...
  local t=$1; shift
  timeout $t python3 -m factory.cli bench --size $SIZE --guidance none --warmup 1 "$@" 2>$OUT/err-$N.log \
    | grep '^{"backbone"' | tee -a $OUT/rows.jsonl | python3 -c "
import sys, json
for r in map(json.loads, sys.stdin):
    print('ROW', r['backbone'], 'batch', r['batch'], r['compile'], r['speedups'], 'mfu', r.get('mfu'),
          'img/s', r['img_per_s'], 'warmup_s', r.get('warmup_s'), 'peak', r.get('peak_mem_gib'))
    if 'profile' in r:
        print('PROFILE busy', r['profile']['busy'], r['profile']['by_kind'])
        for t in r['profile']['top'][:12]: print('  ', t['share'], t['calls'], t['name'])"
  echo "row $N rc=$? t=$(( $(date +%s) - T0 )) s"; N=$((N+1))
}
SD="--backbone sd15 --batch 48 --steps 25 --cfg-scale 7.5 --compile"
DIT="--backbone dit-xl-2 --batch 64 --steps 50 --cfg-scale 4.0 --compile"
row 150 $SD --fuse-projections --channels-last --compile-decoder --profile 5
row 120 $SD --channels-last --compile-decoder
row 120 $SD --fuse-projections
row 90 $DIT --fuse-projections
echo "suite from $(( $(date +%s) - T0 )) s"
timeout 200 python3 -m factory.cli bench --suite gpu --size $SIZE --budget-s 170 --out $OUT 2>$OUT/suite.err | grep -v '^{'
echo "total $(( $(date +%s) - T0 )) s"
