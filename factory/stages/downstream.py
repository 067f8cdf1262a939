"""The downstream stage: a classifier per recipe and mode (and one on the real train split), judged on the real
test split.

    <output>/_train/downstream/...          Ray Train's checkpoints: a stopped run resumes from the latest
    <output>/_downstream/<recipe>-<mode>.json   written when that classifier is finished: a rerun reads it back

Every classifier still to train runs in ONE Ray Train run (its start-up, tens of seconds on 2 cores, is paid
once); the finished ones are read from their result files and never retrained.
"""

from __future__ import annotations

import json
import logging
import os

LOG = logging.getLogger("factory.stages.downstream")
RESULTS = "_downstream"


def classifier_runs(cfg, plan) -> list[tuple[str, str, str]]:
    """(run name, set, mode) of every classifier the config asks for: "real-real", then ``<recipe>-<mode>``."""
    runs = [("real-real", "real", "real")] if "real" in cfg.downstream.train_on else []
    for rp in plan.recipes:
        runs += [(f"{rp.recipe}-{mode}", rp.recipe, mode) for mode in cfg.downstream.train_on if mode != "real"]
    return runs


def run_downstream(cfg, output: str, plan, info, progress: bool = False) -> dict[str, dict[str, float]]:
    """Train and judge the classifiers of ``cfg.downstream`` on the shards under ``output``.

    ``info`` (a :class:`factory.stages.references.RealInfo`) gives the real set's classes, size and mode; the
    real splits are read by Ray Data, never loaded here. Returns set ("real" or a recipe) -> {mode: accuracy}.
    """
    from factory.downstream import TrainSet, train_and_evaluate_many
    from factory.shards import ShardSink

    sink = ShardSink(output, [])
    fs, root = sink.fs, sink.root
    url = os.path.abspath(root) if sink.local else fs.unstrip_protocol(root)
    images = {rp.recipe: rp.images_per_class * len(plan.labels) for rp in plan.recipes}
    results: dict[str, dict] = {}
    todo = []
    for run_name, name, mode in classifier_runs(cfg, plan):
        path = f"{root}/{RESULTS}/{run_name}.json"
        if fs.isfile(path):
            results[run_name] = json.loads(fs.cat_file(path))
        else:
            shards = None
            if mode != "real":
                shards = f"{url}/{name}/parquet"
                if not fs.isdir(f"{root}/{name}/parquet"):
                    raise FileNotFoundError(f"downstream: recipe {name!r} has no Parquet shards under {output} "
                                            "(output.formats must hold parquet)")
            todo.append(TrainSet(run_name, shards, images.get(name, 0) if shards else 0, mode in ("real", "mixed")))
    if todo:
        trained = train_and_evaluate_many(todo, cfg.data, info, cfg.downstream, f"{url}/_train", "downstream",
                                          seed=cfg.seed, progress=progress)
        for run_name, result in trained.items():
            LOG.info("downstream %s: accuracy %.4f, history %s", run_name, result["accuracy"], result["history"])
            # the classifier's marker: a rerun reads it back instead of training
            sink.put(f"{root}/{RESULTS}/{run_name}.json", json.dumps(result, indent=1, sort_keys=True).encode())
            results[run_name] = result
    out: dict[str, dict[str, float]] = {}
    for run_name, name, mode in classifier_runs(cfg, plan):
        out.setdefault(name, {})[mode] = round(float(results[run_name]["accuracy"]), 4)
    return out
