"""A run: the checks, then its stages in order, each reading and writing artifacts under the output URI.

    tune -> references -> sample -> score -> downstream -> report

(tune only where a recipe has ``tune:``: pilots on a validation carve of train choose a parameter, which the
later stages use.)

Every check reads metadata only (config, classes and counts, checkpoints present, output writable), so bad
input fails before anything is written and the driver never holds an image, a feature or a model. Each stage
records its completion under ``<output>/_stages/`` and skips what is already made, so a rerun resumes;
``stages`` reruns some of them (``score,report`` after changing ``eval.k``) and a stage whose inputs are
missing names the stage that makes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from factory import __version__
from factory.config import Config
from factory.data import has_own_split
from factory.dataplane import ensure_ray
from factory.plan import Plan, build_plan, resolve_labels  # noqa: F401  (the run's plan; tests and benches import it here)
from factory.shards import ShardSink
from factory.stages import marker
from factory.stages.marker import STAGES
from factory.stages.sample import ShardError, check_shard_inputs, root_cause  # noqa: F401  (raised by run)

LOG = logging.getLogger("factory.run")
SCORE = "_score/metrics.json"  # the score stage's artifact: metrics of every set, without downstream accuracies


def parse_stages(text: str | None) -> list[str]:
    """``"score,report"`` -> the stages to run, in run order; None -> all of them."""
    if text is None:
        return list(STAGES)
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown or not asked:
        raise ValueError(f"--stages: unknown stage {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"the stages are {','.join(STAGES)}")
    return [s for s in STAGES if s in asked]


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


def write_record(sink: ShardSink, record: dict) -> None:
    """run.json, rewritten whole at each step of the run (started, tuned, failed, done, complete)."""
    sink.put(f"{sink.root}/run.json", json.dumps(record, indent=1, sort_keys=True, default=str).encode())


def check_resume(cfg: Config, plan: Plan, sink: ShardSink) -> None:
    """The committed shards' inputs against this run's, before any work. A tuned recipe is checked with its recorded
    choice when the tune stage will keep it; one whose tune re-runs is checked once the new choice is made."""
    tuned = [r for r, c in cfg.recipes.items() if c.tune is not None]
    if tuned:
        from factory.stages.tune import apply, made_for

        record = marker.read(sink, "tune")
        if record and record.get("made_for") == made_for(cfg):
            cfg, tuned = apply(cfg, record), []
    check_shard_inputs(cfg, plan, sink, recipes=[r for r in cfg.recipes if r not in tuned])


def references_stage(cfg: Config, output: str, plan: Plan, info, sink: ShardSink, progress: bool) -> dict:
    from factory.stages.references import build_reference_bank

    t0 = time.perf_counter()
    meta = build_reference_bank(cfg, output, info, plan.labels, progress=progress)
    return marker.write(sink, "references", time.perf_counter() - t0, classes=len(plan.labels),
                        train_images=meta.get("train_images"))


def score_made_for(cfg: Config, plan: Plan) -> dict:
    """What the score stage's metrics depend on besides the shards: the eval settings, the seed and the plan."""
    labels = hashlib.sha256(json.dumps(plan.labels).encode()).hexdigest()[:16]  # a digest: classes may be many
    return json.loads(json.dumps({"eval": cfg.eval.model_dump(), "seed": cfg.seed, "labels": labels,
                                  "recipes": {rp.recipe: rp.images_per_class for rp in plan.recipes}}))


def score_stage(cfg: Config, output: str, plan: Plan, info, sink: ShardSink, progress: bool, rerun: bool) -> dict:
    """Metrics of every set from the shards' feature columns and the bank (``_score/metrics.json``); kept when
    made for the same eval settings and plan, unless ``rerun``."""
    from factory.stages.sample import require_shards
    from factory.stages.score import score_sets

    require_shards(plan, sink, "score")
    marker.require(sink, "references", "score", "reference bank")
    done = marker.read(sink, "score")
    if not rerun and done and done.get("made_for") == score_made_for(cfg, plan) and sink.fs.isfile(f"{sink.root}/{SCORE}"):
        return done
    t0 = time.perf_counter()
    sets = {"real": sum(info.counts["train"][c] for c in plan.labels),
            **{rp.recipe: rp.images_per_class * len(plan.labels) for rp in plan.recipes}}
    metrics = score_sets(cfg, output, sets, plan.labels, info.class_names, progress=progress)
    sink.put(f"{sink.root}/{SCORE}", json.dumps(metrics, indent=1, sort_keys=True).encode())
    LOG.info("scoring: %.1f s", time.perf_counter() - t0)
    return marker.write(sink, "score", time.perf_counter() - t0, sets={k: int(v) for k, v in sets.items()},
                        made_for=score_made_for(cfg, plan))


def downstream_stage(cfg: Config, output: str, plan: Plan, info, sink: ShardSink, progress: bool) -> dict:
    from factory.stages.downstream import run_downstream
    from factory.stages.sample import require_shards

    require_shards(plan, sink, "downstream")
    t0 = time.perf_counter()
    results = run_downstream(cfg, output, plan, info, progress=progress)
    LOG.info("downstream: %.1f s", time.perf_counter() - t0)
    return marker.write(sink, "downstream", time.perf_counter() - t0, **results)


def collect_metrics(cfg: Config, sink: ShardSink, stage: str, strict: bool = True) -> dict:
    """metrics.json's content: the score stage's metrics with the downstream accuracies merged in (``strict``:
    both stages must have completed; else what there is)."""
    if not strict and marker.read(sink, "score") is None:
        return {}
    marker.require(sink, "score", stage, "metrics")
    metrics = json.loads(sink.fs.cat_file(f"{sink.root}/{SCORE}"))
    downstream = marker.read(sink, "downstream") if cfg.downstream.enabled else None
    if cfg.downstream.enabled and strict:
        downstream = marker.require(sink, "downstream", stage, "accuracies")
    if downstream:
        for name, accuracy in downstream["accuracy"].items():
            if name not in metrics and name in downstream.get("images", {}):  # a random real subset: no scores
                metrics[name] = {"num_images": downstream["images"][name]}
            if name in metrics:
                metrics[name]["downstream"] = accuracy
                if cfg.downstream.seeds > 1:
                    metrics[name]["downstream_std"] = downstream["accuracy_std"][name]
                    metrics[name]["downstream_seeds"] = downstream["accuracy_seeds"][name]
    return metrics


def report_stage(cfg: Config, output: str, plan: Plan, sink: ShardSink, record: dict, t_start: float) -> dict:
    """metrics.json, run.json (complete), report.html and the dataset cards, from the other stages' artifacts."""
    from factory.card import write_cards
    from factory.report import write_report

    t0 = time.perf_counter()
    metrics = collect_metrics(cfg, sink, "report")
    done = {s: marker.read(sink, s) or {} for s in STAGES}
    sample = done["sample"]
    tuned = {r: t for r, t in (done["tune"].get("recipes") or {}).items() if r in cfg.recipes and cfg.recipes[r].tune}
    wall = {"tune": done["tune"].get("wall_seconds") if tuned else None,
            "references": done["references"].get("wall_seconds"), "finetune": sample.get("finetune_seconds"),
            "sampling": sample.get("sampling_seconds"), "scoring": done["score"].get("wall_seconds"),
            "downstream": done["downstream"].get("wall_seconds") if cfg.downstream.enabled else None}
    wall = {k: v for k, v in wall.items() if v is not None}
    wall["total"] = round(time.perf_counter() - t_start, 2)  # this invocation's
    prov = provenance(cfg, output, wall)
    prov.update(state="complete", started=record["started"], finished=time.time(), plan=record["plan"],
                stages=record["stages"])
    for key in ("shards", "healed", "finetune"):
        if key in sample:
            prov[key] = sample[key]
    if tuned:  # a record left by an earlier config whose recipes are no longer tuned is not this run's
        prov["tuning"] = tuned
    sink.put(f"{sink.root}/metrics.json", json.dumps(metrics, indent=1, sort_keys=True).encode())
    write_record(sink, prov)
    write_report(sink, plan, metrics, prov)
    write_cards(cfg, sink, plan, metrics, prov)  # <output>/<recipe>/README.md: load_dataset(<output>/<recipe>)
    marker.write(sink, "report", time.perf_counter() - t0, sets=sorted(metrics))
    return metrics


def run(cfg: Config, output: str, progress: bool = True, verify: bool = False, stages: list[str] | None = None) -> dict:
    """Run ``stages`` (default: all, each skipping what is already made) of ``cfg`` over ``output``; returns the
    metrics (with downstream accuracies) when the score stage has completed, else {}.

    run.json is written first, before any shard, with the plan (``factory status`` / ``verify`` read it). With
    ``verify``, the sample stage first re-makes any shard that fails ``factory verify`` (see :mod:`factory.verify`).
    """
    from factory.preflight import check_checkpoints
    from factory.stages.references import real_info
    from factory.stages.sample import run_sample
    from factory.status import plan_record

    stages = list(STAGES) if stages is None else [s for s in STAGES if s in stages]
    if "://" not in output:  # Ray's workers do not share the driver's working directory
        output = os.path.abspath(output)
    t_start = time.perf_counter()
    info = real_info(cfg)  # names, size, mode, counts: from a prepared set's class index, no images
    if not has_own_split(cfg.data.source, cfg.data.root, "test"):  # said on the console too: every figure is in-sample
        message = (f"data.root {cfg.data.root} has no test/ folder: the test split is the train images, so every "
                   "metric and downstream accuracy is in-sample (factory prepare --test-fraction carves a test split)")
        LOG.warning(message)
        print(f"factory: warning: {message}", file=sys.stderr)
    plan = build_plan(cfg, info)
    for note in check_checkpoints(cfg):  # files present, no weights read: the actors load the models
        LOG.info("pre-flight: %s", note)
    sink = ShardSink(output, cfg.output.formats)
    sink.check_writable()
    check_resume(cfg, plan, sink)  # before run.json is rewritten: shards of another config are refused
    record = {**provenance(cfg, output, {}), "state": "running", "started": time.time(), "stages": stages,
              "plan": plan_record(plan, cfg.output.formats)}
    write_record(sink, record)
    ensure_ray(cfg.executor.address)
    try:
        if any(r.tune is not None for r in cfg.recipes.values()):
            from factory.stages.tune import apply, run_tune

            if "tune" in stages:
                tuned = run_tune(cfg, output, plan, info, sink, progress)
            else:
                tuned = marker.require(sink, "tune", stages[0], "tuned parameters")
            cfg = apply(cfg, tuned)
            record["config"] = cfg.to_dict()
            write_record(sink, record)
        check_shard_inputs(cfg, plan, sink, record="sample" in stages)  # a tune that re-ran may have moved
        if "references" in stages:
            references_stage(cfg, output, plan, info, sink, progress)
        made = 0
        if "sample" in stages:
            made = run_sample(cfg, output, plan, sink, progress=progress, verify=verify)["shards"]["made"]
        if "score" in stages:  # asked for by name, or new shards: rescored even when its metrics look current
            score_stage(cfg, output, plan, info, sink, progress, rerun=len(stages) < len(STAGES) or made > 0)
        if "downstream" in stages and cfg.downstream.enabled:
            downstream_stage(cfg, output, plan, info, sink, progress)
        if "report" in stages:
            return report_stage(cfg, output, plan, sink, record, t_start)
    except Exception as e:
        what = str(e) if isinstance(e, ShardError) else f"{type(e).__name__}: {e}"
        record.update(state="failed", error=what, finished=time.time())
        write_record(sink, record)
        raise
    record.update(state="stages done", finished=time.time())
    write_record(sink, record)
    return collect_metrics(cfg, sink, "run", strict=False)
