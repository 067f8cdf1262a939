"""``factory status OUTPUT``: how far a run has got, read from its output alone (a local path or any fsspec
URI), e.g. while the run goes on on a cluster.

The plan is computed, never stored as shards; ``factory run`` writes it into ``<output>/run.json`` at its
start, before any shard (recipes with images per class and shard size, the classes, the seed, the formats),
so status and ``factory verify`` rebuild the exact plan from the output without the config or the real data.

Cheap at any size: per recipe, one listing of ``_stats/`` (with ``detail=True``, which gives each marker's
modification time in the same listing) and one of ``_errors/``; no marker is opened. A marker's name is its
shard's name (``c<label>-s<index>``), and the plan gives that shard's image count. Throughput is the images
whose markers were written in the last ``window`` seconds (not before the run started), over that time; the
ETA is the remaining images at that rate. A shard whose producer raised is recorded by the worker in
``<output>/<recipe>/_errors/<shard>.json`` (and removed when the shard commits later); only those few files
are read. Imports no torch.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time

from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink

RUN_RECORD = "run.json"
SHARD_NAME = re.compile(r"^c(\d+)-s(\d+)$")


# ----------------------------------------------------------------------------- the plan in run.json


def plan_record(plan: Plan, formats: list[str]) -> dict:
    """What ``run.json`` keeps of a plan: enough to rebuild it exactly (:func:`plan_from_record`)."""
    n = len(plan.labels)
    return {
        "seed": plan.seed, "labels": list(plan.labels), "class_names": list(plan.class_names),
        "formats": list(formats), "shards": len(plan), "images": plan.num_images,
        "recipes": [{"recipe": r.recipe, "images_per_class": r.images_per_class, "shard_size": r.shard_size,
                     "shards": r.shards_per_class * n, "images": r.images_per_class * n} for r in plan.recipes],
    }


def plan_from_record(rec: dict) -> Plan:
    recipes = [RecipePlan(r["recipe"], int(r["images_per_class"]), int(r["shard_size"])) for r in rec["recipes"]]
    return Plan(recipes, [int(x) for x in rec["labels"]], list(rec["class_names"]), int(rec["seed"]))


def read_run_record(sink: ShardSink) -> dict:
    path = f"{sink.root}/{RUN_RECORD}"
    try:
        return json.loads(sink._retry(f"reading {sink.fs.unstrip_protocol(path)}", sink.fs.cat_file, path))
    except FileNotFoundError:
        raise OSError(f"{sink.output}: no {RUN_RECORD}: not a factory output, or its run has not started") from None
    except json.JSONDecodeError as e:
        raise OSError(f"{sink.output}/{RUN_RECORD} is not valid JSON: {e}") from None


def load_plan(output: str) -> tuple[Plan, list[str], dict, ShardSink]:
    """(plan, formats, run record, sink) of the run whose output is ``output``.

    Outputs written before run.json recorded the plan fall back to the config it holds (which may read
    the real train split to size the plan, and so import the heavy modules).
    """
    sink = ShardSink(output, [])
    rec = read_run_record(sink)
    if "plan" in rec:
        plan, formats = plan_from_record(rec["plan"]), list(rec["plan"]["formats"])
    elif "config" in rec:
        from factory.config import from_dict
        from factory.data import load_real
        from factory.plan import plan_for_config

        cfg = from_dict(rec["config"])
        train = load_real(cfg.data.source, "train", cfg.data.root)  # the exact plan needs the real labels
        plan, formats = plan_for_config(cfg, train), list(cfg.output.formats)
    else:
        raise OSError(f"{sink.output}/{RUN_RECORD} holds neither the plan nor the config")
    sink.formats = formats
    return plan, formats, rec, sink


# ----------------------------------------------------------------------------- listings


def mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) of an fsspec ``ls(detail=True)`` entry, whatever the backend
    calls it (local ``mtime``, s3fs ``LastModified``, gcsfs ``updated``, adlfs ``last_modified``)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def list_folder(sink: ShardSink, folder: str, suffix: str, detail: bool = True) -> dict[str, dict]:
    """stem -> fsspec entry (``size``, a modification time) of the files ending in ``suffix`` in ``folder``,
    from one listing; empty when the folder does not exist."""
    try:
        entries = sink._retry(f"listing {folder}", lambda: sink.fs.ls(folder, detail=detail, refresh=True))
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = (e["name"] if detail else e).rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(suffix) and ".tmp-" not in name:
            out[name[: -len(suffix)]] = e if detail else {}
    return out


def shard_images(rp: RecipePlan, name: str, labels: set[int]) -> int | None:
    """Images of the shard called ``name`` in recipe ``rp``; None when the plan has no such shard."""
    m = SHARD_NAME.match(name)
    if m is None:
        return None
    label, index = int(m.group(1)), int(m.group(2))
    if label not in labels or index >= rp.shards_per_class:
        return None
    return min(rp.shard_size, rp.images_per_class - index * rp.shard_size)


# ----------------------------------------------------------------------------- status


def status(output: str, window: float = 300.0, now: float | None = None, max_errors: int = 100) -> dict:
    """Shards and images done against the plan, per recipe and in all, the recent throughput, an ETA, and
    the failed shards with their errors (at most ``max_errors`` read; ``failed`` counts them all)."""
    plan, formats, rec, sink = load_plan(output)
    now = time.time() if now is None else now
    started, finished = rec.get("started"), rec.get("finished")
    end = min(now, finished) if finished is not None else now  # a run that ended: its last minutes
    since = max(end - window, started) if started is not None else end - window
    labels = set(plan.labels)
    rows, errors_read = [], 0
    latest = None
    for rp in plan.recipes:
        done = list_folder(sink, f"{sink.root}/{rp.recipe}/_stats", ".json")
        shards = images = recent = 0
        for name, info in done.items():
            n = shard_images(rp, name, labels)
            if n is None:
                continue  # not this plan's (another config wrote here)
            shards += 1
            images += n
            t = mtime(info)
            if t is not None:
                latest = t if latest is None else max(latest, t)
                if since < t <= end:
                    recent += n
        failed = []
        err = list_folder(sink, f"{sink.root}/{rp.recipe}/_errors", ".json", detail=False)
        for name in sorted(set(err) - set(done)):
            item = {"shard": name, "error": None, "time": None}
            if errors_read < max_errors:
                errors_read += 1
                try:
                    e = json.loads(sink.fs.cat_file(f"{sink.root}/{rp.recipe}/_errors/{name}.json"))
                    item.update(error=e.get("error"), time=e.get("time"))
                except (OSError, ValueError):
                    pass  # committed and cleared meanwhile, or half-visible: the name is enough
            failed.append(item)
        planned_images = rp.images_per_class * len(plan.labels)
        rows.append({"recipe": rp.recipe, "shards_done": shards, "shards_planned": rp.shards_per_class * len(labels),
                     "images_done": images, "images_planned": planned_images, "recent_images": recent,
                     "failed": failed})
    span = end - since
    total = {"recipe": "total", **{k: sum(r[k] for r in rows) for k in
                                   ("shards_done", "shards_planned", "images_done", "images_planned", "recent_images")}}
    total["failed"] = [dict(f, shard=f"{r['recipe']}/{f['shard']}") for r in rows for f in r["failed"]]
    for r in rows + [total]:
        r["img_per_s"] = r["recent_images"] / span if span > 0 else None
        left = r["images_planned"] - r["images_done"]
        r["eta_seconds"] = 0.0 if left <= 0 else (left / r["img_per_s"] if r["img_per_s"] else None)
    return {
        "output": sink.output, "config": (rec.get("config") or {}).get("name"), "state": rec.get("state"),
        "started": started, "finished": rec.get("finished"), "now": now, "window_seconds": span,
        "last_commit": latest, "formats": formats, "recipes": rows, "total": total,
    }


# ----------------------------------------------------------------------------- text


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_status(st: dict) -> str:
    head = ["recipe", "shards", "images", "done", "img/s", "ETA", "failed"]
    rows = []
    for r in st["recipes"] + [st["total"]]:
        pct = 100.0 * r["images_done"] / r["images_planned"] if r["images_planned"] else 100.0
        eta = "done" if r["eta_seconds"] == 0 else _duration(r["eta_seconds"])
        rate = "-" if r["img_per_s"] is None else f"{r['img_per_s']:.3g}"
        rows.append([r["recipe"], f"{r['shards_done']:,}/{r['shards_planned']:,}",
                     f"{r['images_done']:,}/{r['images_planned']:,}", f"{pct:.1f}%", rate, eta, str(len(r["failed"]))])
    width = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, width))).rstrip()
             for x in [head, *rows]]
    last = st["last_commit"]
    lines = [f"{st['output']}: config {st['config']}, state {st['state'] or 'unknown'}, "
             f"started {_when(st['started'])}" + (f", finished {_when(st['finished'])}" if st["finished"] else ""),
             *table,
             f"img/s over the last {_duration(st['window_seconds'])}; last shard committed "
             + ("never" if last is None else f"{_duration(max(0.0, st['now'] - last))} ago")]
    failed = st["total"]["failed"]
    if failed:
        lines.append(f"failed shards ({len(failed)}):")
        lines += [f"  {f['error']}" if f["error"] and f["shard"] in f["error"]
                  else f"  {f['shard']}: {f['error'] or '(error not read)'}" for f in failed]
    return "\n".join(lines)
