"""Data-plane benchmarks (issue 6, item 7): orchestration throughput, and overhead over a bare loop.

    python -m factory.bench_dataplane --shards 100000 [--actors 2] [--output DIR]
    python -m factory.bench_dataplane --overhead jobs/digits.yaml [--recipes cfg,chamfer] [--actors 1]

Every shard is a real plan lookup, a stats-marker check, a Parquet commit of one tiny record and a
stats file, through the same Ray Data actor pool as ``factory run``; only the model is missing. Prints
one JSON line: shards/s, wall time, and the driver's peak RSS sampled along the run (it should stay flat
as the plan grows, since the driver holds one small stats row per shard in flight).

``--overhead CONFIG`` makes the same shards of a real config twice in one process: first with a bare
in-process loop (build the producer, sample each shard, commit it with ``ShardSink``), then through the
full data plane as ``factory run`` does (Ray start, the actor pool, each actor loading its models,
writers, markers). With ``--actors 1`` both sample on the same number of cores (one actor with the
config's torch threads against the same threads in-process), so the wall-time ratio is the price of the
data plane. It also checks that both paths wrote byte-identical shards.
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


def _files(root: str) -> dict[str, bytes]:
    import os

    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith((".parquet", ".tar")):
                path = os.path.join(d, n)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def overhead(config: str, recipes: list[str] | None, actors: int, overrides: list[str] | None = None) -> dict:
    """Wall time of a config's shards through the data plane over a bare in-process loop, one process."""
    import functools

    import torch

    from factory.config import load_config
    from factory.data import load_real
    from factory.generate import SyntheticProducer, encoder
    from factory.run import build_plan

    cfg = load_config(config, overrides)
    if recipes:
        unknown = [r for r in recipes if r not in cfg.recipes]
        if unknown:
            raise SystemExit(f"unknown recipe {unknown[0]!r}; the config has {', '.join(cfg.recipes)}")
        cfg.recipes = {r: cfg.recipes[r] for r in recipes}
    plan = build_plan(cfg, load_real(cfg.data.source, "train", cfg.data.root))
    bare_out, plane_out = tempfile.mkdtemp(prefix="factory-bare-"), tempfile.mkdtemp(prefix="factory-plane-")
    try:
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        producer = SyntheticProducer(cfg)  # sets the config's torch threads, as each actor does
        sink = ShardSink(bare_out, cfg.output.formats)
        for sid in range(len(plan)):
            shard = plan.shard(sid)
            sink.commit(shard.recipe, shard.name, encoder(cfg)(producer(shard)), {"shard_id": sid, "seed": shard.seed})
        bare = time.perf_counter() - t0
        torch.set_num_threads(threads)
        del producer

        t0 = time.perf_counter()
        ensure_ray(cfg.executor.address, num_cpus=max(actors, 1) * int(cfg.executor.num_cpus))
        sink = ShardSink(plane_out, cfg.output.formats)
        rows = list(run_shards(plan, pending_shards(plan, sink), functools.partial(SyntheticProducer, cfg.to_dict()),
                               plane_out, cfg.output.formats, (actors, actors), num_cpus=cfg.executor.num_cpus,
                               progress=False, finish=encoder(cfg)))
        plane = time.perf_counter() - t0
        a, b = _files(bare_out), _files(plane_out)
        result = {"config": config, "recipes": list(cfg.recipes), "shards": len(plan), "images": plan.num_images,
                  "actors": actors, "torch_threads": cfg.executor.torch_threads,
                  "bare_loop_s": round(bare, 1), "data_plane_s": round(plane, 1),
                  "ratio": round(plane / bare, 3), "shards_made": len(rows),
                  "same_bytes": a == b and len(a) == len(plan) * len(cfg.output.formats)}
    finally:
        shutil.rmtree(bare_out, ignore_errors=True)
        shutil.rmtree(plane_out, ignore_errors=True)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default 2; 1 with --overhead)")
    p.add_argument("--output", help="folder for the shards (default: a temporary folder, removed after)")
    p.add_argument("--shards-per-call", type=int, default=1, help="shards per actor call (Ray Data batch)")
    p.add_argument("--overhead", metavar="CONFIG", help="data plane vs bare loop on a real config's shards")
    p.add_argument("--recipes", help="with --overhead: comma-separated recipes (default: all)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --overhead: config overrides")
    args = p.parse_args(argv)
    if args.overhead:
        return overhead(args.overhead, args.recipes.split(",") if args.recipes else None, args.actors or 1, args.set)
    args.actors = args.actors or 2
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
                                     num_cpus=1, progress=False,
                                     shards_per_call=args.shards_per_call), 1):
        if n % max(1, len(pending) // 10) == 0:
            rss.append(round(_rss_mb(), 1))
    wall = time.perf_counter() - t0
    result = {"shards": len(pending), "wall_s": round(wall, 1), "shards_per_s": round(len(pending) / wall, 1),
              "pending_scan_s": round(t_plan, 2), "actors": args.actors,
              "shards_per_call": args.shards_per_call,
              "driver_peak_rss_mb_by_decile": rss}
    if not args.output:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
