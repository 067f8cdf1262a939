"""A run: validate, plan, stream the pending shards through the data plane, then score and report.

Everything that can be checked is checked before any shard is made (config, classes, real data,
checkpoints, a writable output), so bad input leaves nothing behind. A rerun over the same output
skips every shard whose stats marker exists, and rewrites nothing of it.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from factory import __version__
from factory.config import Config, ConfigError
from factory.data import RealSet, load_real
from factory.dataplane import ShardFailed, ensure_ray, pending_shards, run_shards
from factory.plan import Plan, RecipePlan, images_per_class
from factory.shards import ShardSink


LOG = logging.getLogger("factory.run")


class ShardError(RuntimeError):
    """A shard could not be made; the message carries the root cause raised in the worker."""


def root_cause(e: BaseException) -> BaseException:
    """The exception a worker raised, under Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "cause", None) or e.__cause__
        if nxt is None:
            break
        e = nxt
    return e


def resolve_labels(cfg: Config, real: RealSet) -> list[int]:
    if cfg.data.classes is None:
        return list(range(real.num_classes))
    labels = []
    for i, name in enumerate(cfg.data.classes):
        if name not in real.class_names:
            raise ConfigError(
                f"data.classes[{i}]: unknown class {name!r} for data source {cfg.data.source!r}; "
                f"known classes: {', '.join(real.class_names)}"
            )
        labels.append(real.class_names.index(name))
    return labels


def build_plan(cfg: Config, train) -> Plan:
    """The run's plan from its real train split: a loaded ``RealSet`` or a ``RealInfo`` (metadata only)."""
    labels = resolve_labels(cfg, train)
    size = train.train_size() if hasattr(train, "train_size") else len(train.labels)
    recipes = [
        RecipePlan(name, images_per_class(r.scale, r.images_per_class, size, train.num_classes),
                   cfg.sampling.shard_size)
        for name, r in cfg.recipes.items()
    ]
    return Plan(recipes, labels, train.class_names, cfg.seed)


def _as_float(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


def evaluate_dataset(source: str, root: str, real_source: str, real_root: str | None = None,
                     features_name: str = "cnn", features_checkpoint: str = "digits", k: int = 5) -> dict:
    """Score any image set (our shards, an image folder, Parquet, WebDataset) against a real set's test split.

    Class ids are matched by class name, so a set whose folders are named like the real classes works.
    """
    from factory import metrics
    from factory.config import FeaturesConfig
    from factory.data import DataError
    from factory.generate import build_features, embed

    cfg = Config(features=FeaturesConfig(name=features_name, checkpoint=features_checkpoint))
    fake = load_real(source, "train", root)
    train, test = load_real(real_source, "train", real_root), load_real(real_source, "test", real_root)
    unknown = sorted(set(fake.class_names) - set(train.class_names))
    if unknown:
        raise DataError(f"{root}: classes {unknown} are not classes of {real_source!r}")
    if fake.size != train.size:
        raise DataError(f"{root}: images are {fake.size[1]}x{fake.size[0]}, the real set's are "
                        f"{train.size[1]}x{train.size[0]}")
    if fake.mode != train.mode:  # e.g. WebP, which has no grey mode, of a grey set
        from PIL import Image

        fake.images = np.stack([np.asarray(Image.fromarray(a).convert(train.mode)) for a in fake.images])
        fake.mode = train.mode
    labels = np.asarray([train.class_names.index(fake.class_names[i]) for i in fake.labels], dtype=np.int64)
    features = build_features(cfg)
    train_feats = embed(features, _as_float(train.images))
    gaussian = metrics.ClassGaussian(train_feats, torch.from_numpy(train.labels))
    fake_feats = embed(features, _as_float(fake.images))
    out = metrics.summary(embed(features, _as_float(test.images)), torch.from_numpy(test.labels), fake_feats,
                          torch.from_numpy(labels), gaussian, k=k)
    mem = metrics.memorisation(fake_feats, train_feats, top=8)
    out["memorisation"] = {key: v for key, v in mem.items() if key != "closest"}
    out["num_images"] = int(len(labels))
    return out


def downstream_accuracy(cfg: Config, sink: ShardSink, plan: Plan, train: RealSet, test: RealSet,
                        metrics: dict, progress: bool = False) -> None:
    """Train the downstream classifier per recipe and mode on Ray Train; accuracies go into ``metrics``."""
    import os

    from factory.downstream import train_and_evaluate_many

    storage = f"{sink.root}/_train"
    if sink.local:
        storage = os.path.abspath(storage)
    else:
        storage = sink.fs.unstrip_protocol(storage)
    runs = []
    if "real" in cfg.downstream.train_on:
        runs.append(("real-real", None, train))
    for rp in plan.recipes:
        files = [sink.fs.unstrip_protocol(f) if not sink.local else f for f in sink.shard_files(rp.recipe, "parquet")]
        for mode in cfg.downstream.train_on:
            if mode != "real":
                runs.append((f"{rp.recipe}-{mode}", files, train if mode == "mixed" else None))
    # every classifier in one Ray Train run: its start-up, tens of seconds on 2 cores, is paid once
    results = train_and_evaluate_many(runs, test, cfg.downstream, storage, "downstream", seed=cfg.seed,
                                      progress=progress)
    for run_name, result in results.items():
        LOG.info("downstream %s: accuracy %.4f, history %s", run_name, result["accuracy"], result["history"])
        name, mode = run_name.rsplit("-", 1)
        metrics[name].setdefault("downstream", {})[mode] = round(float(result["accuracy"]), 4)


def finetune_recipes(cfg: Config, sink: ShardSink, train: RealSet, recipes: set[str]) -> tuple[dict, dict]:
    """Real-Fake: every recipe with a ``finetune`` block gets its LoRA adapter at ``<output>/<recipe>/lora/``,
    made on Ray Train when one of its shards is pending (a complete adapter is kept; a stopped fine-tune
    resumes from its checkpoint under ``<output>/_train``). Returns (recipe -> adapter URI, summaries)."""
    import os

    from factory.realfake import finetune

    adapters, summaries = {}, {}
    for name, r in cfg.recipes.items():
        if r.finetune is None:
            continue
        where = f"{sink.root}/{name}/lora"
        storage = f"{sink.root}/_train"
        if sink.local:
            where, storage = os.path.abspath(where), os.path.abspath(storage)
        else:
            where, storage = sink.fs.unstrip_protocol(where), sink.fs.unstrip_protocol(storage)
        adapters[name] = where
        if name in recipes:
            summary = finetune(cfg, name, train, where, storage)
            summaries[name] = {k: summary[k] for k in ("steps", "steps_trained", "resumed_from", "seconds")}
            summaries[name]["loss"] = summary["history"][-1] if summary["history"] else None
    return adapters, summaries


def provenance(cfg: Config, output: str, wall: dict) -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "diffusers", "ray", "pyarrow", "numpy", "scikit-learn", "pot"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"factory": __version__, "code_revision": rev, "python": platform.python_version(),
            "packages": versions, "config": cfg.to_dict(), "output": output, "wall_seconds": wall}


def run(cfg: Config, output: str, progress: bool = True, verify: bool = False) -> dict:
    """Make every pending shard of ``cfg`` under ``output``, then write metrics.json and report.html.

    run.json is written first, before any shard, with the plan (``factory status`` / ``verify`` read it).
    A committed shard with a file missing is re-made; with ``verify``, so is any shard that fails
    ``factory verify`` (sizes, sha256, decoding): see :mod:`factory.verify` for why that is opt-in.
    """
    from factory.generate import SyntheticProducer
    from factory.card import write_cards
    from factory.report import write_report
    from factory.status import plan_record
    from factory.verify import drop_incomplete, verify as verify_output

    from factory.stages.references import build_reference_bank, real_info
    from factory.stages.score import score_sets

    t_start = time.perf_counter()
    info = real_info(cfg)  # names, size, mode, counts: from a prepared set's class index, no images
    plan = build_plan(cfg, info)
    # Load the models once on the driver: a missing checkpoint fails here, before any shard is written.
    SyntheticProducer(cfg)
    sink = ShardSink(output, cfg.output.formats)
    sink.check_writable()
    started = time.time()
    record = {**provenance(cfg, output, {}), "state": "running", "started": started,
              "plan": plan_record(plan, cfg.output.formats)}
    sink.put(f"{sink.root}/run.json", json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    ensure_ray(cfg.executor.address)
    if verify:  # shards that fail factory verify, or (always) a committed shard with a file gone: re-made
        healed = verify_output(output, repair=True, plan=plan, formats=cfg.output.formats)["repaired"]
    else:
        healed = drop_incomplete(plan, sink, cfg.output.formats)
    pending = pending_shards(plan, sink)
    t_refs = time.perf_counter()
    build_reference_bank(cfg, output, info, plan.labels, progress=progress)
    t_finetune = time.perf_counter()
    train = test = None  # the stages not yet streaming (fine-tune, downstream) load the splits when they run
    if any(r.finetune is not None for r in cfg.recipes.values()):
        train = load_real(cfg.data.source, "train", cfg.data.root)
    adapters, finetuned = finetune_recipes(cfg, sink, train, {plan.shard(s).recipe for s in pending})
    made = 0
    t_sample = time.perf_counter()
    try:
        for row in run_shards(
            plan, pending, functools.partial(SyntheticProducer, cfg.to_dict(), adapters, output), output,
            cfg.output.formats,
            num_actors=tuple(cfg.executor.num_actors), num_cpus=cfg.executor.num_cpus,
            num_gpus=cfg.executor.num_gpus, progress=progress, desc="sampling",
        ):
            made += not row["skipped"]
    except Exception as e:
        cause = root_cause(e)
        what = str(cause) if isinstance(cause, ShardFailed) else f"{type(cause).__name__}: {cause}"
        record.update(state="failed", error=what, finished=time.time())
        sink.put(f"{sink.root}/run.json", json.dumps(record, indent=1, sort_keys=True, default=str).encode())
        raise ShardError(f"{what} (completed shards are kept; rerun to resume)") from e
    t_score = time.perf_counter()
    LOG.info("sampling: %d shards made, %d already complete, %.1f s", made, len(plan) - len(pending), t_score - t_sample)
    sets = {"real": sum(info.counts["train"][c] for c in plan.labels), **{rp.recipe: rp.images_per_class * len(plan.labels)
                                                                          for rp in plan.recipes}}
    metrics = score_sets(cfg, output, sets, plan.labels, info.class_names, progress=progress)
    t_train = time.perf_counter()
    LOG.info("scoring: %.1f s", t_train - t_score)
    if cfg.downstream.enabled:
        train = train or load_real(cfg.data.source, "train", cfg.data.root)
        test = load_real(cfg.data.source, "test", cfg.data.root)
        downstream_accuracy(cfg, sink, plan, train, test, metrics, progress=progress)
        LOG.info("downstream: %.1f s", time.perf_counter() - t_train)
    wall = {"references": round(t_finetune - t_refs, 2), "finetune": round(t_sample - t_finetune, 2),
            "sampling": round(t_score - t_sample, 2), "scoring": round(t_train - t_score, 2),
            "downstream": round(time.perf_counter() - t_train, 2)}
    wall["total"] = round(time.perf_counter() - t_start, 2)
    prov = provenance(cfg, output, wall)
    prov["shards"] = {"planned": len(plan), "made": made, "already_complete": len(plan) - len(pending)}
    prov.update(state="complete", started=started, finished=time.time(), plan=record["plan"])
    if healed:
        prov["healed"] = healed
    if finetuned:
        prov["finetune"] = finetuned
    sink.put(f"{sink.root}/metrics.json", json.dumps(metrics, indent=1, sort_keys=True).encode())
    sink.put(f"{sink.root}/run.json", json.dumps(prov, indent=1, sort_keys=True, default=str).encode())
    write_report(sink, plan, metrics, prov)
    write_cards(cfg, sink, plan, metrics, prov)  # <output>/<recipe>/README.md: load_dataset(<output>/<recipe>)
    return metrics
