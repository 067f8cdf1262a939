"""The sample stage: Real-Fake fine-tunes where a recipe asks for one, then every pending shard streams through
the data plane's actor pool, each actor building its producer (models, bank reader) itself.

A committed shard is never re-made (its stats marker is the commit); a failed shard leaves the committed ones in
place and the error names the shard and its root cause, so a rerun resumes.
"""

from __future__ import annotations

import functools
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


def require_shards(plan, sink, stage: str) -> dict:
    """The sample stage's record, checked against this plan: every shard committed, or a clear error."""
    record = marker.require(sink, "sample", stage, "shards")
    missing = len(pending_shards(plan, sink))
    if missing:
        raise marker.StageMissing(f"{stage} needs the sample stage's shards: {missing} of {len(plan)} planned shards "
                                  "are not made (the plan changed?): run --stages sample first")
    return record
