"""The sample stage: Real-Fake fine-tunes where a recipe asks for one, then every pending shard streams through
the data plane's actor pool, each actor building its producer (models, bank reader) itself.

A committed shard is never re-made (its stats marker is the commit); a failed shard leaves the committed ones in
place and the error names the shard and its root cause, so a rerun resumes. A shard's name does not say what it
was made with, so each recipe's inputs are recorded before its first shard and a rerun with other ones is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

from factory.dataplane import ShardFailed, pending_shards, run_shards
from factory.stages import marker

LOG = logging.getLogger("factory.stages.sample")


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


def finetune_recipes(cfg, sink, train, recipes: set[str]) -> tuple[dict, dict]:
    """Real-Fake: every recipe with a ``finetune`` block gets its LoRA adapter at ``<output>/<recipe>/lora/``,
    made on Ray Train when one of its shards is pending (a complete adapter is kept; a stopped fine-tune
    resumes from its checkpoint under ``<output>/_train``). Returns (recipe -> adapter URI, summaries)."""
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


def run_sample(cfg, output: str, plan, sink, progress: bool = False, verify: bool = False) -> dict:
    """Make every pending shard of ``plan`` under ``output``; returns (and records) the stage's stats."""
    from factory.data import load_real
    from factory.generate import SyntheticProducer, encoder
    from factory.stages.references import train_discriminators
    from factory.verify import drop_incomplete, verify as verify_output

    t0 = time.perf_counter()
    marker.require(sink, "references", "sample", "reference bank")
    if verify:  # shards that fail factory verify, or (always) a committed shard with a file gone: re-made
        healed = verify_output(output, repair=True, plan=plan, formats=cfg.output.formats)["repaired"]
    else:
        healed = drop_incomplete(plan, sink, cfg.output.formats)
    pending = pending_shards(plan, sink)
    train = None  # fine-tuning does not stream yet: it loads the train split when a fine-tuned recipe is pending
    todo = {plan.shard(s).recipe for s in pending}
    if any(cfg.recipes[r].finetune is not None for r in todo):
        train = load_real(cfg.data.source, "train", cfg.data.root)
    t_finetune = time.perf_counter()
    adapters, finetuned = finetune_recipes(cfg, sink, train, todo)
    del train
    train_discriminators(cfg, output, adapters)  # a fine-tuned low-density recipe's: sampled with its adapter
    t_shards = time.perf_counter()
    made, busy = 0, {"make": 0.0, "commit": 0.0}
    try:
        for row in run_shards(
            plan, pending, functools.partial(SyntheticProducer, cfg.to_dict(), adapters, output), output,
            cfg.output.formats,
            num_actors=tuple(cfg.executor.num_actors), num_cpus=cfg.executor.num_cpus,
            num_gpus=cfg.executor.num_gpus, progress=progress, desc="sampling", finish=encoder(cfg),
        ):
            made += not row["skipped"]
            busy["make"] += float(row["seconds"])
            busy["commit"] += float(row["commit_seconds"])
    except Exception as e:
        cause = root_cause(e)
        what = str(cause) if isinstance(cause, ShardFailed) else f"{type(cause).__name__}: {cause}"
        raise ShardError(f"{what} (completed shards are kept; rerun to resume)") from e
    t_end = time.perf_counter()
    LOG.info("sampling: %d shards made, %d already complete, %.1f s", made, len(plan) - len(pending), t_end - t_shards)
    stats = {"shards": {"planned": len(plan), "made": made, "already_complete": len(plan) - len(pending)},
             "images": sum(rp.images_per_class for rp in plan.recipes) * len(plan.labels),
             "finetune_seconds": round(t_shards - t_finetune, 2), "sampling_seconds": round(t_end - t_shards, 2),
             # summed over shards: the actors' making and the CPU stage's encoding + commit, which overlap
             "make_seconds": round(busy["make"], 2), "commit_seconds": round(busy["commit"], 2)}
    if healed:
        stats["healed"] = healed
    if finetuned:
        stats["finetune"] = finetuned
    return marker.write(sink, "sample", t_end - t0, **stats)


SHARD_INPUTS = ("seed", "data", "backbone", "features", "sampling")  # with the recipe's own section


def shard_inputs(cfg, recipe: str) -> dict:
    """What a recipe's shards are a function of besides their ids. ``images_per_class`` and ``data.classes`` only
    add or drop shards, and ``tune:`` is how a value was found, not the value, so they are left out."""
    c = json.loads(json.dumps(cfg.to_dict(), default=str))
    inputs = {k: c[k] for k in SHARD_INPUTS}
    inputs["data"] = {k: v for k, v in c["data"].items() if k != "classes"}
    inputs["recipe"] = {k: v for k, v in c["recipes"][recipe].items() if k not in ("tune", "images_per_class")}
    return inputs


def _changes(old, new, at: str = "") -> list[str]:
    """``key: old -> new`` for each value that differs; a key only one side has is another factory version's."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) & set(new), key=str)
                for c in _changes(old[k], new[k], f"{at}.{k}" if at else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in _changes(a, b, f"{at}.{i}")]
    return [] if old == new else [f"{at}: {old!r} -> {new!r}"]


def check_shard_inputs(cfg, plan, sink, recipes=None, record: bool = False) -> None:
    """Refuse to resume a recipe whose committed shards were made with other inputs: the output would mix two
    configs under one run.json. ``<output>/_stages/shards/<recipe>.json`` holds what they were made with;
    ``record`` writes it for the recipes that have none yet (before their first shard)."""
    for rp in plan.recipes:
        if recipes is not None and rp.recipe not in recipes:
            continue
        want, have = shard_inputs(cfg, rp.recipe), marker.read(sink, f"shards/{rp.recipe}")
        changes = _changes(have["made_for"], want) if have is not None else []
        if changes and sink.completed(rp.recipe):
            raise ValueError(
                f"{sink.root}/{rp.recipe} holds shards made with another config ({'; '.join(changes[:4])}"
                f"{'; …' if len(changes) > 4 else ''}): resuming would mix the two. Write to a new --output, or "
                f"delete {sink.root}/{rp.recipe} to re-make the recipe")
        if record and (have is None or have["made_for"] != want):
            marker.write(sink, f"shards/{rp.recipe}", 0.0, made_for=want)


def require_shards(plan, sink, stage: str) -> dict:
    """The sample stage's record, checked against this plan: every shard committed, or a clear error."""
    record = marker.require(sink, "sample", stage, "shards")
    missing = len(pending_shards(plan, sink))
    if missing:
        raise marker.StageMissing(f"{stage} needs the sample stage's shards: {missing} of {len(plan)} planned shards "
                                  "are not made (the plan changed?): run --stages sample first")
    return record
