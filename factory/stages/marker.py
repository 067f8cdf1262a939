"""Each stage's completion record: ``<output>/_stages/<stage>.json``, written last, with its wall time and counts.

A later stage (or ``--stages`` rerun) reads it to know an earlier stage finished, and the report reads the
stats of all of them; what a stage made is in its own artifacts, never here.
"""

from __future__ import annotations

import json
import time

STAGES = ("tune", "references", "sample", "score", "downstream", "report")
FOLDER = "_stages"


class StageMissing(RuntimeError):
    """A stage's inputs are missing: the message names the stage that makes them."""


def path(sink, stage: str) -> str:
    return f"{sink.root}/{FOLDER}/{stage}.json"


def write(sink, stage: str, seconds: float, **stats) -> dict:
    record = {"stage": stage, "wall_seconds": round(seconds, 2), "finished": time.time(), **stats}
    sink.put(path(sink, stage), json.dumps(record, indent=1, sort_keys=True, default=str).encode())
    return record


def read(sink, stage: str) -> dict | None:
    """The stage's record, or None when it has not completed over this output."""
    p = path(sink, stage)
    return json.loads(sink.fs.cat_file(p)) if sink.fs.isfile(p) else None


def require(sink, stage: str, needed_by: str, what: str) -> dict:
    """The stage's record, or a clear error naming it and what ``needed_by`` needs of it."""
    record = read(sink, stage)
    if record is None:
        raise StageMissing(f"{needed_by} needs the {stage} stage's {what}: run --stages {stage} first")
    return record
