"""The data plane at the device: how busy one GPU stays through a full-size job's sampling stage.

``python -m factory.bench_plane_gpu`` runs the 10x ImageNet DiT job's shape (random full-size DiT-XL/2 and
DINOv2-L saved as folders and loaded by the real ``from_pretrained`` path, a generated 256 px real set) for
a few classes on one GPU actor, through the real references and sample stages on a local Ray, and reads
the device's own utilisation counter (NVML, the figure ``nvidia-smi`` shows) every 0.1 s. Prints and
returns the busy share of the sampling stage's wall time, and the GPU stage's and the CPU (encode +
commit) stage's seconds summed over the shards. Needs a GPU; issue 10's target is >= 90 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time


class UtilisationSampler:
    """NVML's GPU utilisation (% of the last period with a kernel running), sampled in a thread."""

    def __init__(self, period: float = 0.1, index: int = 0):
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle, self.period = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), period
        self.samples: list[tuple[float, int, int]] = []  # (time, gpu %, memory used MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            u = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            m = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((time.time(), int(u.gpu), int(m.used // 2**20)))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def busy(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {"samples": 0}
        active = [i for i, s in enumerate(inside) if s[1] > 0]
        steady = inside[active[0]: active[-1] + 1] if active else []
        return {"samples": len(inside), "busy_mean_pct": round(sum(s[1] for s in inside) / len(inside), 1),
                "busy_steady_pct": round(sum(s[1] for s in steady) / max(1, len(steady)), 1),
                "first_kernel_s": round(inside[active[0]][0] - t0, 1) if active else None,
                "peak_mem_mib": max(s[2] for s in inside)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m factory.bench_plane_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--job", default="jobs/imagenet1k_10x_dit.yaml")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=200, help="images per class")
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--set", action="append", default=[], help="more config overrides")
    p.add_argument("--work", default=None, help="folder for models, data and output (default: a temporary one)")
    p.add_argument("--out", default=None, help="folder for plane.json")
    p.add_argument("--size", choices=("full", "tiny"), default=None,
                   help="model size (default full on a GPU; tiny, 32 px and no counters on a CPU, as a check)")
    args = p.parse_args(argv)

    import ray
    import torch

    from factory.config import load_config
    from factory.rehearse import class_names_of, save_tiny_models, write_real_set
    from factory.run import run

    gpu = torch.cuda.is_available()
    size = args.size or ("full" if gpu else "tiny")
    work = args.work or tempfile.mkdtemp(prefix="factory-plane-gpu-")
    cfg = load_config(args.job)
    names = class_names_of(cfg)[: args.classes]
    t0 = time.perf_counter()
    with torch.device("cuda" if gpu else "cpu"):  # random init of 1 B parameters: minutes on a CPU, seconds here
        models = save_tiny_models(cfg.backbone.name, cfg.features.name, os.path.join(work, "models"), size=size)
    write_real_set(os.path.join(work, "data"), names, 256 if size == "full" else 32, "RGB", 32, 8, seed=0)
    setup_s = time.perf_counter() - t0
    recipe = next(iter(cfg.recipes))
    sets = ["data.source=parquet", f"data.root={os.path.join(work, 'data')}", f"data.num_classes={len(names)}",
            f"backbone.checkpoint={models['backbone']}", f"features.checkpoint={models['features']}",
            f"recipes.{recipe}.images_per_class={args.per_class}", f"sampling.shard_size={args.shard_size}",
            "executor.num_actors=[1,1]", "executor.address=null", "downstream.enabled=false"]
    if not gpu:
        sets += ["executor.num_gpus=0", "executor.num_cpus=1", "executor.torch_threads=1",
                 "backbone.options.dtype=fp32", "features.options.dtype=fp32", "data.image_size=32"]
    sets += args.set
    cfg = load_config(args.job, sets)
    output = os.path.join(work, "out")
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False)
    run(cfg, output, progress=False, stages=["references"])
    with (UtilisationSampler() if gpu else contextlib.nullcontext()) as util:
        t_start = time.time()
        run(cfg, output, progress=False, stages=["sample"])
        t_end = time.time()
    marker = json.load(open(os.path.join(output, "_stages", "sample.json")))
    stats = [json.load(open(os.path.join(output, recipe, "_stats", f))) for f in
             sorted(os.listdir(os.path.join(output, recipe, "_stats")))]
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "size": size, "job": args.job,
              "classes": len(names),
              "images": marker.get("images"), "shards": marker["shards"], "setup_s": round(setup_s, 1),
              "sample_stage_s": round(t_end - t_start, 1), "sampling_seconds": marker.get("sampling_seconds"),
              "make_seconds": marker.get("make_seconds"), "commit_seconds": marker.get("commit_seconds"),
              "img_per_s": round((marker.get("images") or 0) / (t_end - t_start), 2),
              "shard_bytes": sum(sum(f["bytes"] for f in s["files"].values()) for s in stats),
              **(util.busy(t_start, t_end) if gpu else {}), "overrides": sets}
    print("PLANE " + json.dumps(result), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "plane.json"), "w") as f:
            json.dump({**result, "util_trace": util.samples if gpu else []}, f)
    ray.shutdown()
    return result


if __name__ == "__main__":
    main()
