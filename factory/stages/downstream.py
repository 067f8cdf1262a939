"""The downstream stage: a classifier per recipe and mode (and one on the real train split), judged on the real
test split.

    <output>/_train/downstream/...          Ray Train's checkpoints: a stopped run resumes from the latest
    <output>/_downstream/<recipe>-<mode>[-s<i>].json   written when that classifier is finished: a rerun reads it
                                                       back (-s<i>: the i-th extra seed)

Every classifier still to train runs in ONE Ray Train run (its start-up, tens of seconds on 2 cores, is paid
once); the finished ones are read from their result files and never retrained.
"""

from __future__ import annotations

import json
import logging
import os

from typing import NamedTuple

import numpy as np

LOG = logging.getLogger("factory.stages.downstream")
RESULTS = "_downstream"


class Run(NamedTuple):
    """One classifier to train: its run name, the set it trains on ("real", "random_real..." or a recipe), its
    mode, its seed index and, for a random real subset, the images per class."""

    name: str
    set: str
    mode: str
    seed: int = 0
    per_class: int | None = None


def classifier_runs(cfg, plan) -> list[Run]:
    """Every classifier the config asks for: "real-real", the random real subsets, then ``<recipe>-<mode>``; each
    ``downstream.seeds`` times (seed index i > 0 adds ``-s<i>`` to the name, so more seeds keep the first)."""
    d = cfg.downstream
    sets = [("real", "real", None)] if "real" in d.train_on else []
    if d.random_real:  # one row per distinct images-per-class of the recipes
        ipcs = sorted({rp.images_per_class for rp in plan.recipes})
        sets += [("random_real" if len(ipcs) == 1 else f"random_real_{k}", "real", k) for k in ipcs]
    taken = {name for name, _, _ in sets}
    for rp in plan.recipes:
        if rp.recipe in taken:
            raise ValueError(f"recipe {rp.recipe!r}: the name of a downstream row of real images; rename the recipe")
        sets += [(rp.recipe, mode, None) for mode in d.train_on if mode != "real"]
    return [Run(f"{name}-{mode}" + (f"-s{i}" if i else ""), name, mode, i, k)
            for name, mode, k in sets for i in range(d.seeds)]


def run_downstream(cfg, output: str, plan, info, progress: bool = False) -> dict[str, dict]:
    """Train and judge the classifiers of ``cfg.downstream`` on the shards under ``output``.

    ``info`` (a :class:`factory.stages.references.RealInfo`) gives the real set's classes, size and mode; the
    real splits are read by Ray Data, never loaded here. Returns ``{"accuracy": {set: {mode: mean over seeds}},
    "accuracy_std": {set: {mode: std}}`` (0 with one seed), ``"accuracy_seeds": {set: {mode: [per seed]}}``,
    ``"images": {set: training images}}`` for the sets the score stage does not know (the random real subsets).
    """
    from factory.downstream import TrainSet, train_and_evaluate_many
    from factory.shards import ShardSink

    sink = ShardSink(output, [])
    fs, root = sink.fs, sink.root
    url = os.path.abspath(root) if sink.local else fs.unstrip_protocol(root)
    images = {rp.recipe: rp.images_per_class * len(plan.labels) for rp in plan.recipes}
    results: dict[str, dict] = {}
    todo = []
    runs = classifier_runs(cfg, plan)
    for run in runs:
        path = f"{root}/{RESULTS}/{run.name}.json"
        if fs.isfile(path):
            results[run.name] = json.loads(fs.cat_file(path))
            continue
        shards = None
        if run.mode != "real":
            shards = f"{url}/{run.set}/parquet"
            if not fs.isdir(f"{root}/{run.set}/parquet"):
                raise FileNotFoundError(f"downstream: recipe {run.set!r} has no Parquet shards under {output} "
                                        "(output.formats must hold parquet)")
        todo.append(TrainSet(run.name, shards, images.get(run.set, 0) if shards else 0, run.mode in ("real", "mixed"),
                             run.per_class, run.seed))
    if todo:
        trained = train_and_evaluate_many(todo, cfg.data, info, cfg.downstream, f"{url}/_train", "downstream",
                                          seed=cfg.seed, progress=progress)
        for run_name, result in trained.items():
            LOG.info("downstream %s: accuracy %.4f, history %s", run_name, result["accuracy"], result["history"])
            # the classifier's marker: a rerun reads it back instead of training
            sink.put(f"{root}/{RESULTS}/{run_name}.json", json.dumps(result, indent=1, sort_keys=True).encode())
            results[run_name] = result
    seeds: dict[str, dict[str, list[float]]] = {}
    out: dict[str, dict] = {"accuracy": {}, "accuracy_std": {}, "accuracy_seeds": seeds, "images": {}}
    for run in runs:
        seeds.setdefault(run.set, {}).setdefault(run.mode, []).append(round(float(results[run.name]["accuracy"]), 4))
        if run.per_class:
            out["images"][run.set] = int(results[run.name]["train_images"])
    for name, modes in seeds.items():
        out["accuracy"][name] = {m: round(float(np.mean(a)), 4) for m, a in modes.items()}
        out["accuracy_std"][name] = {m: round(float(np.std(a)), 4) for m, a in modes.items()}
    return out
