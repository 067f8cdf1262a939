"""The tune stage: a recipe's ``tune:`` picks one parameter (a guidance strength, ω, k) by a Ray Tune grid of
small pilot runs, scored against a validation split carved from the train split. The test split is never read.

    carve (a Ray task per pilot class) -> a Tune trial per value: the recipe's real stages on the carve
    (references, sample, score[, downstream]) -> the best value by the objective -> the run's recipe

The carve (``<output>/_tune/data-<digest>``) is a Parquet set in ``factory prepare``'s layout: per pilot class,
``validation_per_class`` seeded train images as its test split and at most ``references_per_class`` of the rest
as its train split. Its class index keeps every class's name and label, so a class-conditional model gets the
labels it was trained with. Each trial is a run of its own under ``<output>/_tune/<recipe>/<i>`` (a pilot that
breaks off resumes from its shards and markers) with ``metrics.json`` written last; the choice and the trial
table are this stage's record (``_stages/tune.json``), which later stages apply and run.json and the report show.

A trial is a Tune function trainable holding no CPU (a one-byte memory bundle: Tune refuses an empty one). Its
pilot runs as a task outside the trial's placement group, so the pilot's actors, scoring tasks and Ray Train
workers are scheduled as any run's are, not squeezed into the trial's bundle.

What the pilot cannot see: the feature space and a packaged model were trained on the whole train split, the
validation carve included (never on test); a pilot of a few classes and images is noisy, so values that differ
by less than a pilot's seed-to-seed spread are a tie broken by grid order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from factory.config import TUNE_OBJECTIVES as MODE
from factory.stages import marker

LOG = logging.getLogger("factory.tune")
FOLDER = "_tune"
COLUMNS = ("precision", "recall", "coverage", "f1_pc", "label_agreement", "fd", "downstream")
SATURATED = 0.95  # pilot coverage at or above this for every value: the validation split cannot rank them


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def pilot_labels(cfg, labels: list[int], n: int) -> list[int]:
    """A seeded pick of ``n`` of the plan's classes (all of them when fewer), in label order."""
    if len(labels) <= n:
        return list(labels)
    rng = np.random.default_rng([cfg.seed, 7919])
    return sorted(int(labels[i]) for i in rng.choice(len(labels), n, replace=False))


def carve_class(source: str, root: str | None, label: int, class_names: list[str], seed: int, validation: int,
                references: int, out: str) -> dict:
    """Write one class of the carve: its validation images (the pilot's test split) and references (train)."""
    import fsspec

    from factory.bank import ClassImages
    from factory.data import DataError
    from factory.shards import encode_image, encode_parquet

    images = ClassImages(source, root)("train", label)
    if len(images) <= validation:
        raise DataError(f"tune: class {class_names[label]!r} has {len(images)} train images, too few to hold out "
                        f"validation_per_class = {validation} and keep any as references")
    order = np.random.default_rng([seed, label, 104729]).permutation(len(images))
    fs, base = fsspec.core.url_to_fs(out)
    counts = {}
    for split, picked in (("test", order[:validation]), ("train", order[validation:validation + references])):
        records = [{"key": f"{split}-c{label:05d}-{int(i):06d}", "image": encode_image(images[i]), "label": label,
                    "class_name": class_names[label], "seed": -1} for i in sorted(picked)]
        fs.makedirs(f"{base}/{split}", exist_ok=True)
        with fs.open(f"{base}/{split}/c{label:05d}.parquet", "wb") as f:
            f.write(encode_parquet(records, class_names))
        counts[split] = len(records)
    return {"label": label, "counts": counts}


def carve(cfg, info, labels: list[int], pilot, output: str) -> str:
    """The validation carve for ``labels`` (made once, ``_SUCCESS`` last); returns its root."""
    import fsspec
    import ray

    made_for = {"source": cfg.data.source, "root": cfg.data.root, "seed": cfg.seed, "labels": labels,
                "validation": pilot.validation_per_class, "references": pilot.references_per_class}
    out = f"{output}/{FOLDER}/data-{_digest(made_for)}"
    fs, base = fsspec.core.url_to_fs(out)
    if fs.isfile(f"{base}/_SUCCESS"):
        return out
    task = ray.remote(num_cpus=1)(carve_class)
    done = ray.get([task.remote(cfg.data.source, cfg.data.root, c, info.class_names, cfg.seed,
                                pilot.validation_per_class, pilot.references_per_class, out) for c in labels])
    counts = {s: [0] * info.num_classes for s in ("train", "test")}
    for row in done:
        for split, n in row["counts"].items():
            counts[split][row["label"]] = n
    index = {"class_names": info.class_names, "size": list(info.size), "mode": info.mode, "counts": counts,
             "carved_from": "train"}
    with fs.open(f"{base}/classes.json", "w") as f:
        f.write(json.dumps(index, indent=1))
    with fs.open(f"{base}/_SUCCESS", "w") as f:
        f.write(json.dumps(made_for, indent=1))
    return out


def pilot_config(cfg, recipe: str, value, carve_root: str, labels: list[int], class_names: list[str],
                 images_per_class: int) -> dict:
    """The config of one trial: the recipe alone, ``tune.param`` set to ``value``, on the carve's classes."""
    from factory.config import set_dotted

    data = cfg.to_dict()
    r = data["recipes"][recipe]
    set_dotted(r, r.pop("tune")["param"], value)
    r.update(images_per_class=images_per_class, scale=1.0)
    data["recipes"] = {recipe: r}
    data["name"] = f"{cfg.name}-tune-{recipe}"
    data["data"] = {"source": "parquet", "root": carve_root, "classes": [class_names[c] for c in labels]}
    data["sampling"]["shard_size"] = images_per_class
    data["output"]["formats"] = ["parquet"]
    down = data["downstream"]
    down.update(enabled=cfg.recipes[recipe].tune.objective == "downstream", train_on=["synthetic"], random_real=False)
    return data


def pilot_trial(config: dict, output: str) -> dict:
    """One trial: the recipe's real stages on the carve; its pooled metrics (and downstream accuracy)."""
    from factory.bank import real_info
    from factory.config import Config
    from factory.plan import build_plan
    from factory.shards import ShardSink
    from factory.stages.downstream import run_downstream
    from factory.stages.references import build_reference_bank
    from factory.stages.sample import run_sample
    from factory.stages.score import score_sets

    cfg = Config.model_validate(config)
    sink = ShardSink(output, cfg.output.formats)
    if sink.fs.isfile(f"{sink.root}/metrics.json"):  # this trial finished before (a resumed pilot)
        return json.loads(sink.fs.cat_file(f"{sink.root}/metrics.json"))
    t0 = time.perf_counter()
    info = real_info(cfg)
    plan = build_plan(cfg, info)
    (recipe,) = cfg.recipes
    if marker.read(sink, "references") is None:
        build_reference_bank(cfg, output, info, plan.labels, progress=False)
        marker.write(sink, "references", time.perf_counter() - t0, classes=len(plan.labels))
    run_sample(cfg, output, plan, sink, progress=False)
    n = plan.recipes[0].images_per_class * len(plan.labels)
    m = score_sets(cfg, output, {recipe: n}, plan.labels, info.class_names, progress=False)[recipe]
    row = {k: float(m[k]) for k in COLUMNS if k in m}
    if cfg.downstream.enabled:
        row["downstream"] = float(run_downstream(cfg, output, plan, info)["accuracy"][recipe])
    row["seconds"] = round(time.perf_counter() - t0, 1)
    sink.put(f"{sink.root}/metrics.json", json.dumps(row, sort_keys=True).encode())
    return row


def _trainable(params: dict, configs: list[dict], outputs: list[str]) -> None:
    """Tune's function trainable: runs trial ``params["index"]`` as a task outside the trial's bundle."""
    import ray
    from ray import tune

    i = params["index"]
    task = ray.remote(num_cpus=0)(pilot_trial).options(scheduling_strategy="DEFAULT")
    tune.report(ray.get(task.remote(configs[i], outputs[i])))


def tune_recipe(cfg, recipe: str, info, labels: list[int], images_per_class: int, output: str) -> dict:
    """Run the recipe's trials with Ray Tune; returns its record: the grid, the trial table and the choice."""
    from ray import tune

    spec = cfg.recipes[recipe].tune
    picked = pilot_labels(cfg, labels, spec.pilot.classes)
    ipc = spec.pilot.images_for(images_per_class)
    root = carve(cfg, info, picked, spec.pilot, output)
    grid = spec.grid()
    configs = [pilot_config(cfg, recipe, v, root, picked, info.class_names, ipc) for v in grid]
    outputs = [f"{output}/{FOLDER}/{recipe}/{i}" for i in range(len(grid))]
    t0 = time.perf_counter()
    storage = tempfile.mkdtemp(prefix="factory-tune-")  # Tune's own experiment state; the pilots' are in outputs
    quiet = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the legacy reporter, which verbose=0 silences: the console is ours
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trainable, configs=configs, outputs=outputs), {"memory": 1}),
            param_space={"index": tune.grid_search(list(range(len(grid))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.pilot.concurrent),
            run_config=tune.RunConfig(name=recipe, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
        if results.errors:
            raise RuntimeError(f"tune {recipe}: a pilot trial failed: {results.errors[0]}")
        rows = {r.config["index"]: {k: r.metrics[k] for k in (*COLUMNS, "seconds") if k in r.metrics}
                for r in results}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if quiet is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT")
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = quiet
    trials = [{"value": v, **rows[i]} for i, v in enumerate(grid)]
    sign = 1 if MODE[spec.objective] == "max" else -1
    best = max(range(len(grid)), key=lambda i: (sign * trials[i][spec.objective], -i))  # ties: the first in grid
    warning = saturation(trials, spec.objective, ipc, spec.pilot.validation_per_class)
    return {"param": spec.param, "objective": spec.objective, "mode": MODE[spec.objective], "chosen": grid[best],
            "written": _get(cfg.recipes[recipe], spec.param), "trials": trials,
            **({"warning": warning} if warning else {}),
            "pilot": {"classes": [info.class_names[c] for c in picked], "images_per_class": ipc,
                      "validation_per_class": spec.pilot.validation_per_class, "carve": root},
            "seconds": round(time.perf_counter() - t0, 1)}


def saturation(trials: list[dict], objective: str, images_per_class: int, validation_per_class: int) -> str | None:
    """Why a coverage-driven choice cannot be trusted, or None. With about as many samples a class as validation
    images, every value covers nearly all of them (Fashion-MNIST, 20 against 30: 0.97-0.99 for gamma 0.03 to 0.1,
    where the run's 200 against 1,000 tell them apart: 0.57 to 0.48), so the choice is noise."""
    if objective not in ("coverage", "f1_pc") or any("coverage" not in t for t in trials):
        return None
    low = min(t["coverage"] for t in trials)
    if low < SATURATED:
        return None
    return (f"coverage is saturated in the pilot (every value covers >= {low:.2f} of the validation split): "
            f"{validation_per_class} validation images a class are too few to rank {images_per_class} samples a "
            f"class by {objective}; raise pilot.validation_per_class to several times pilot.images_per_class, "
            f"as in the run's test split")


def _get(recipe_cfg, param: str):
    from factory.config import get_dotted

    return get_dotted(recipe_cfg.model_dump(exclude={"tune"}), param)


def made_for(cfg) -> dict:
    """What the choices depend on: every tuned recipe's config and the pilot-relevant rest of the run's."""
    keep = ("seed", "data", "backbone", "features", "sampling", "eval")
    tuned = {r: c.model_dump() for r, c in cfg.recipes.items() if c.tune is not None}
    down = cfg.downstream.model_dump() if any(c.tune.objective == "downstream" for c in cfg.recipes.values()
                                               if c.tune is not None) else None
    return json.loads(json.dumps({**{k: cfg.model_dump()[k] for k in keep}, "recipes": tuned, "downstream": down},
                                 default=str))


def run_tune(cfg, output: str, plan, info, sink, progress: bool = False) -> dict:
    """The stage: every tuned recipe's record, kept when made for the same config."""
    done = marker.read(sink, "tune")
    if done and done.get("made_for") == made_for(cfg):
        return done
    t0 = time.perf_counter()
    ipc = {rp.recipe: rp.images_per_class for rp in plan.recipes}
    tuned = {}
    for recipe, r in cfg.recipes.items():
        if r.tune is not None:
            if progress:
                print(f"tune {recipe}: {len(r.tune.grid())} pilot runs of {r.tune.param} in "
                      f"{r.tune.grid()}, by {r.tune.objective} on a validation carve of train", file=sys.stderr)
            tuned[recipe] = tune_recipe(cfg, recipe, info, plan.labels, ipc[recipe], output)
            LOG.info("tune %s: %s = %s (%s %s)", recipe, r.tune.param, tuned[recipe]["chosen"], r.tune.objective,
                     tuned[recipe]["trials"])
            if "warning" in tuned[recipe]:
                LOG.warning("tune %s: %s", recipe, tuned[recipe]["warning"])
                if progress:
                    print(f"tune {recipe}: warning: {tuned[recipe]['warning']}", file=sys.stderr)
    return marker.write(sink, "tune", time.perf_counter() - t0, recipes=tuned, made_for=made_for(cfg))


def apply(cfg, record: dict | None):
    """``cfg`` with each tuned recipe's parameter set to its chosen value (``tune:`` kept, for the record)."""
    from factory.config import Config, set_dotted

    if not record or not record.get("recipes"):
        return cfg
    data = cfg.to_dict()
    for recipe, rec in record["recipes"].items():
        set_dotted(data["recipes"][recipe], rec["param"], rec["chosen"])
    return Config.model_validate(data)
