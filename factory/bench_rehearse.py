"""``python -m factory.bench_rehearse``: a job's rehearsal at two sizes, with the driver's and actors' peak memory.

Runs ``factory run JOB --rehearse`` (every stage, the job's full shape, tiny models) once per images-per-class
value as a subprocess, samples every 0.5 s the resident memory of the driver (the subprocess) and of each
Ray worker process it started (``ray::`` in its command line, among the driver's descendants: another run's
workers on the machine are not counted), and prints one JSON line: per size, each stage's wall
time (run.json), the driver's peak RSS and the largest actor's peak RSS, and the ratio of the driver peaks
between the sizes (the scale target: within 1.15x while the shard count stays the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _watch(proc: subprocess.Popen, period: float = 0.5) -> dict:
    import psutil

    driver = psutil.Process(proc.pid)
    peak_driver = peak_actor = 0
    while proc.poll() is None:
        try:
            peak_driver = max(peak_driver, driver.memory_info().rss)
        except psutil.Error:
            pass
        try:  # the run's own local Ray: its raylet's workers descend from the driver; another run's do not
            workers = driver.children(recursive=True)
        except psutil.Error:
            workers = []
        for p in workers:
            try:
                if " ".join(p.cmdline()).startswith("ray::"):
                    peak_actor = max(peak_actor, p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(period)
    return {"driver_peak_rss_mb": round(peak_driver / 2**20, 1), "actor_peak_rss_mb": round(peak_actor / 2**20, 1)}


def rehearse(job: str, recipe: str, per_class: int, extra: list[str], output: str) -> dict:
    cmd = [sys.executable, "-m", "factory.cli", "run", job, "--rehearse", "--quiet", "--json", "--output", output,
           "--set", f"recipes.{recipe}.images_per_class={per_class}", *sum((["--set", s] for s in extra), [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mem = _watch(proc)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"rehearsal at {per_class} per class failed: {err[-2000:]}")
    with open(os.path.join(output, "run.json")) as f:
        run = json.load(f)
    return {"images_per_class": per_class, "images": run["plan"]["images"] if "images" in run.get("plan", {}) else None,
            "shards": run.get("shards"), "stage_seconds": run["wall_seconds"],
            "wall_s": round(time.perf_counter() - t0, 1), **mem}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m factory.bench_rehearse", description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/imagenet1k_10x_dit.yaml")
    parser.add_argument("--recipe", default="chamfer")
    parser.add_argument("--sizes", default="10,100", help="images per class, comma-separated")
    parser.add_argument("--set", action="append", default=["sampling.steps=2"], metavar="KEY=VALUE")
    parser.add_argument("--work", default=None, help="folder for the outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bench-rehearse-")
    rows = [rehearse(args.job, args.recipe, int(n), args.set, os.path.join(work, f"ipc{n}"))
            for n in args.sizes.split(",")]
    out = {"job": args.job, "sets": args.set, "runs": rows,
           "driver_peak_ratio": round(rows[-1]["driver_peak_rss_mb"] / rows[0]["driver_peak_rss_mb"], 3)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
