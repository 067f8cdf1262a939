"""The data plane: pending shard ids stream through a Ray Data actor pool; each call makes one shard.

reader (pending shard ids) -> worker (a producer loaded once per actor makes a shard's records) -> writer
(``finish``, e.g. encoding, then ``ShardSink.commit``: formats first, stats marker last; a CPU stage of the
same pipeline behind GPU actors, the actor itself in a CPU pool). The driver only consumes one small
stats row per shard, so its memory does not grow with the images. Knows nothing of diffusion: the
producer is any picklable zero-argument factory returning ``producer(shard) -> list[record]``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterator

import numpy as np

from factory.plan import Plan
from factory.shards import ShardSink


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray when neither is set."""
    import ray

    if ray.is_initialized():
        return
    from factory import console

    address = address or os.environ.get("RAY_ADDRESS")
    # The dashboard serves Ray's State API, which Ray Train V2's placement-group cleaner polls every second
    # for its controller's state: without it each poll logs "Failed to query Ray Train Controller actor
    # state". What Ray's processes print reaches this console with --verbose only (factory/console.py).
    kwargs = dict(include_dashboard=True, log_to_driver=console.verbose(), configure_logging=False)
    with console.ray_startup():
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over shards instead
    ctx.print_on_execution_start = False
    console.quiet_ray_data()


class ShardFailed(RuntimeError):
    """A producer raised on a shard: the message names the shard and the original error."""


class ShardWorker:
    """Ray Data callable class (the accelerator stage): builds its producer once, then makes one shard per row.

    Behind a GPU it only makes records: they travel to :class:`ShardCommitter`, a CPU stage of the same
    pipeline, so encoding and upload of one shard overlap the making of the next (``commit=True``: it runs
    the committer itself, as a CPU pool does). A producer that raises (bad input,
    NaN during sampling) does not raise through Ray, whose wrappers keep the original error only as
    traceback text: the row carries ``error`` ("Type: message"), and :func:`run_shards` raises
    :class:`ShardFailed` with it on the driver. A worker that dies (preemption) is Ray's to retry.
    """

    def __init__(self, make_producer: Callable, plan: Plan, output: str, formats: list[str], storage_options=None,
                 finish: Callable | None = None, commit: bool = False):
        self.plan = plan
        self.sink = ShardSink(output, formats, storage_options)
        self.producer = make_producer()
        # commit=True: this actor also finishes and commits (a CPU pool, where a second stage buys nothing)
        self.committer = ShardCommitter(plan, output, formats, storage_options, finish) if commit else None

    def __call__(self, batch: dict) -> dict:
        rows = {"shard_id": [], "records": [], "seconds": [], "skipped": [], "error": []}
        for sid in batch["shard_id"]:
            shard = self.plan.shard(int(sid))
            t0 = time.perf_counter()
            skipped = self.sink.is_complete(shard.recipe, shard.name)  # a retried task may find it done
            records, error = None, ""
            if not skipped:
                try:
                    records = self.producer(shard)
                    if len(records) != shard.num_images:
                        raise RuntimeError(f"producer made {len(records)} records, plan says {shard.num_images}")
                except Exception as e:  # a bad shard: name it, mark nothing complete
                    error = _named(shard, e)
            rows["shard_id"].append(shard.shard_id)
            rows["records"].append(_Records(records))
            rows["seconds"].append(time.perf_counter() - t0)
            rows["skipped"].append(skipped)
            rows["error"].append(error)
        out = {k: np.asarray(v) for k, v in rows.items() if k != "records"}
        out["records"] = np.empty(len(rows["records"]), dtype=object)
        out["records"][:] = rows["records"]
        return out if self.committer is None else self.committer(out)


class _Records:
    """One shard's records as one opaque Python object, so Ray Data pickles them as they are instead of
    converting a list of dicts of arrays to Arrow columns."""

    def __init__(self, records: list[dict] | None):
        self.records = records


def _named(shard, e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    where = f"{shard.recipe}/{shard.name}"
    return msg if where in msg else f"shard {where}: {msg}"


class ShardCommitter:
    """Ray Data callable (the CPU stage): ``finish`` (e.g. image encoding) then ``ShardSink.commit``,
    formats first, stats marker last. Errors become the row's ``error`` as in :class:`ShardWorker`, and
    a failed shard's error is kept at ``<output>/<recipe>/_errors/<shard>.json`` for ``factory status``."""

    def __init__(self, plan: Plan, output: str, formats: list[str], storage_options=None,
                 finish: Callable | None = None):
        self.plan = plan
        self.sink = ShardSink(output, formats, storage_options)
        self.finish = finish

    def __call__(self, batch: dict) -> dict:
        rows = {"shard_id": [], "recipe": [], "shard": [], "num_images": [], "seconds": [], "commit_seconds": [],
                "skipped": [], "error": []}
        for sid, box, seconds, skipped, error in zip(batch["shard_id"], batch["records"], batch["seconds"],
                                                      batch["skipped"], batch["error"]):
            shard = self.plan.shard(int(sid))
            t0 = time.perf_counter()
            error = str(error)
            if not skipped and not error:
                try:
                    records = box.records if self.finish is None else self.finish(box.records)
                    self.sink.commit(shard.recipe, shard.name, records, {
                        "shard_id": shard.shard_id, "label": shard.label, "class_name": shard.class_name,
                        "index": shard.index, "seed": shard.seed,
                    })
                except Exception as e:  # an unreachable store, an encoder error: nothing marked complete
                    error = _named(shard, e)
            if not skipped:
                self._error_record(shard, error or None)
            rows["shard_id"].append(shard.shard_id)
            rows["recipe"].append(shard.recipe)
            rows["shard"].append(shard.name)
            rows["num_images"].append(shard.num_images)
            rows["seconds"].append(float(seconds))
            rows["commit_seconds"].append(time.perf_counter() - t0)
            rows["skipped"].append(bool(skipped))
            rows["error"].append(error)
        return {k: np.asarray(v) for k, v in rows.items()}

    def _error_record(self, shard, error: str | None) -> None:
        """``<output>/<recipe>/_errors/<shard>.json`` holds a failed shard's error for ``factory status``, and
        goes when the shard commits. Best effort, one try: the store may be the very thing failing."""
        path = f"{self.sink.root}/{shard.recipe}/_errors/{shard.name}.json"
        try:
            if error is None:
                os.remove(path) if self.sink.local else self.sink.fs.rm_file(path)
            else:
                data = json.dumps({"shard": shard.name, "shard_id": shard.shard_id, "error": error, "time": time.time()})
                (self.sink.put if self.sink.local else self.sink.fs.pipe_file)(path, data.encode())
        except Exception:  # FileNotFoundError (the usual case when clearing), or the store is down
            pass


def pending_shards(plan: Plan, sink: ShardSink, shard_ids: range | list[int] | None = None) -> list[int]:
    """Shard ids of ``plan`` (or of ``shard_ids``) whose stats marker is missing."""
    ids = range(len(plan)) if shard_ids is None else shard_ids
    done = {r.recipe: sink.completed(r.recipe) for r in plan.recipes}
    return [sid for sid in ids if (s := plan.shard(sid)).name not in done[s.recipe]]


def run_shards(
    plan: Plan,
    shard_ids: list[int],
    make_producer: Callable,
    output: str,
    formats: list[str],
    num_actors: tuple[int, int] = (1, 1),
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    storage_options: dict | None = None,
    progress: bool = True,
    desc: str = "shards",
    shards_per_call: int = 1,
    finish: Callable | None = None,
    commit_stage: bool | None = None,
    commit_cpus: float = 0.0,
) -> Iterator[dict]:
    """Make ``shard_ids`` of ``plan`` through a Ray Data actor pool; yields one stats row per shard.

    With ``commit_stage`` (default: when the actors hold GPUs) two stages of one pipeline: the actors make
    records, and CPU actors (``commit_cpus`` each; 0 shares the actors' nodes) apply ``finish`` and commit
    them, so the accelerator is not idle while a shard is encoded and uploaded. Without it each actor
    finishes and commits its own shards: on a CPU pool a second stage would only add processes and copies.

    ``shards_per_call`` rows go to one call of an actor (Ray Data's batch). The worker commits each
    shard as it finishes and a retried call skips the committed ones, so a lost actor costs at most
    the shard in flight whatever the batch; batches above 1 only pay off when shards are cheap.
    """
    import ray

    from factory.console import bar

    if not shard_ids:
        return
    ds = ray.data.from_items([{"shard_id": int(s)} for s in shard_ids], override_num_blocks=min(len(shard_ids), 200))
    if commit_stage is None:
        commit_stage = num_gpus > 0
    ds = ds.map_batches(
        ShardWorker,
        fn_constructor_kwargs=dict(
            make_producer=make_producer, plan=plan, output=output, formats=formats, storage_options=storage_options,
            finish=finish, commit=not commit_stage,
        ),
        batch_size=shards_per_call,
        compute=ray.data.ActorPoolStrategy(min_size=num_actors[0], max_size=num_actors[1]),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    if commit_stage:
        ds = ds.map_batches(
            ShardCommitter,
            fn_constructor_kwargs=dict(
                plan=plan, output=output, formats=formats, storage_options=storage_options, finish=finish
            ),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors[1])),
            num_cpus=commit_cpus,
        )
    images = sum(plan.shard(int(s)).num_images for s in shard_ids)
    with bar(images, desc, unit="img", disable=not progress) as shown:  # images/s and ETA; shards in the postfix
        for done, row in enumerate(ds.iter_rows(), 1):
            if row["error"]:
                raise ShardFailed(row["error"])
            shown.update(int(row["num_images"]))
            shown.set_postfix_str(f"{done}/{len(shard_ids)} shards", refresh=False)
            yield row
