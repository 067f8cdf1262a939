"""Orchestration benchmark (issue 6, 7a): shards of a null generator through the real data plane.

    python -m factory.bench_dataplane --shards 100000 [--actors 2] [--output DIR]

Every shard is a real plan lookup, a stats-marker check, a Parquet commit of one tiny record and a
stats file, through the same Ray Data actor pool as ``factory run``; only the model is missing. Prints
one JSON line: shards/s, wall time, and the driver's peak RSS sampled along the run (it should stay flat
as the plan grows, since the driver holds one small stats row per shard in flight).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time

from factory.dataplane import ensure_ray, pending_shards, run_shards
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink


class NullProducer:
    """One constant record per shard: no model, no sampling."""

    def __call__(self, shard):
        return [{"key": shard.key(0), "image": b"", "label": shard.label, "class_name": shard.class_name,
                 "seed": shard.seed}]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--output", help="folder for the shards (default: a temporary folder, removed after)")
    args = p.parse_args(argv)
    per_class = -(-args.shards // args.classes)
    plan = Plan([RecipePlan("null", per_class, 1)], list(range(args.classes)),
                [f"c{i}" for i in range(args.classes)], seed=0)
    out = args.output or tempfile.mkdtemp(prefix="factory-bench-")
    ensure_ray(num_cpus=args.actors)
    sink = ShardSink(out, ["parquet"])
    t0 = time.perf_counter()
    pending = pending_shards(plan, sink)
    t_plan = time.perf_counter() - t0
    rss = []
    t0 = time.perf_counter()
    for n, _ in enumerate(run_shards(plan, pending, NullProducer, out, ["parquet"], (args.actors, args.actors),
                                     num_cpus=1, progress=False), 1):
        if n % max(1, len(pending) // 10) == 0:
            rss.append(round(_rss_mb(), 1))
    wall = time.perf_counter() - t0
    result = {"shards": len(pending), "wall_s": round(wall, 1), "shards_per_s": round(len(pending) / wall, 1),
              "pending_scan_s": round(t_plan, 2), "actors": args.actors,
              "driver_peak_rss_mb_by_decile": rss}
    if not args.output:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
