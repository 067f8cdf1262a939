#!/bin/bash
# The one lent call of 2026-11-27 (H200): the data plane at the device, then plain-CFG rows for the MFU gap.
# Run from the repo root on the GPU machine with .whl/ carried. The device image has torch, transformers,
# pyarrow and pandas but not Ray, diffusers or pydantic; prepare .whl/ here first (x86-64, CPython 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       diffusers pydantic pydantic-core annotated-types typing-inspection \
#       jsonschema jsonschema-specifications referencing rpds-py importlib-metadata
#   Ray's wheel (79 MB) is over the 64 MiB a call carries: unpack it, drop ray/jars, ray/rllib, ray/serve,
#   the tests and the dashboard's source maps, and carry it as .whl/ray-stripped.tar.xz (30 MB; a minimal
#   Ray without the dashboard is what the benchmark starts).
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
tar -xJf .whl/ray-stripped.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD
echo "setup $(( $(date +%s) - T0 )) s"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout ${PLANE_S:-270} python3 -m factory.bench_plane_gpu --classes 4 --per-class 150 --shard-size 50 --out $OUT \
    2>&1 | tee $OUT/plane.log | grep '^PLANE'
for row in "dit-xl-2 64 50 4.0" "dit-xl-2 128 50 4.0" "sd15 32 25 7.5"; do
  set -- $row
  timeout 100 python3 -m factory.cli bench --backbone $1 --size full --guidance none --batch $2 --steps $3 \
      --cfg-scale $4 --compile --warmup 1 2>&1 | tee -a $OUT/rows.jsonl | grep '^{"backbone"'
done
