"""``factory verify OUTPUT``: is every planned shard there and intact? ``--repair`` un-completes the bad ones.

For each shard of the plan (rebuilt from ``<output>/run.json``, see :mod:`factory.status`): its completion
marker exists; every format's file exists with the size and sha256 the marker records; the Parquet file
decodes with pyarrow and the WebDataset tar with tarfile, each holding the plan's keys, in order, of the
shard's class, every image's header and checksums sound (PIL ``verify``); and the marker agrees with the plan
(class, index, seed, image count), so the counts per class add up to the plan's. A shard without a marker is
*missing* (not made yet, or a run stopped); one whose marker and files disagree is *bad*.

Shards are checked on a thread pool (the work is reading objects); at most a few shards per thread are in
flight and each thread holds one file's bytes at a time, so the driver's memory stays flat at any size.

Repair removes a bad shard's marker first, then its files: a crash in between leaves the shard merely
"not complete", never a marker over missing or wrong files. The next ``factory run`` then re-makes it, and
as a shard's bytes are a function of (config, shard id), the same bytes as before.

Healing on rerun, and why it is split in two: proving a shard intact means reading all of its bytes, which
for a 13M-image run is the whole dataset again; even comparing sizes needs every marker opened (one request
per shard). So a plain ``factory run`` does only what one listing per folder allows (:func:`drop_incomplete`:
a committed shard with a file missing from its folder's listing gets its marker removed and is re-made, e.g.
after a partial copy or a changed ``output.formats``), and ``factory run --verify`` runs the full check with
repair (:func:`verify`) before making the pending shards.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import tarfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from factory.plan import Plan, Shard
from factory.shards import SUFFIX, ShardSink
from factory.status import list_folder, load_plan

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _check_image(data: bytes, where: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad image
        return f"{where}: image does not decode ({type(e).__name__}: {e})"
    return None


def check_parquet(data: bytes, shard: Shard) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt file
        return [f"parquet does not decode ({type(e).__name__}: {e})"]
    problems = []
    keys = table.column("key").to_pylist() if "key" in table.column_names else []
    if keys != [shard.key(i) for i in range(shard.num_images)]:
        problems.append(f"parquet holds {table.num_rows} rows / keys other than the plan's {shard.num_images}")
    labels = set(table.column("label").to_pylist()) if "label" in table.column_names else set()
    if labels != {shard.label}:
        problems.append(f"parquet labels {sorted(labels)}, the shard's class is {shard.label}")
    for key, img in zip(keys, table.column("image").to_pylist() if "image" in table.column_names else []):
        raw = img.get("bytes") if isinstance(img, dict) else img  # the datasets Image struct, or plain bytes
        if (bad := _check_image(raw or b"", f"parquet {key}")) is not None:
            problems.append(bad)
            break
    return problems


def check_webdataset(data: bytes, shard: Shard) -> list[str]:
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"webdataset does not decode ({type(e).__name__}: {e})"]
    problems = []
    if list(samples) != [shard.key(i) for i in range(shard.num_images)]:
        problems.append(f"webdataset holds {len(samples)} samples / keys other than the plan's {shard.num_images}")
    for key, parts in samples.items():
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None or "cls" not in parts:
            problems.append(f"webdataset {key}: members {sorted(parts)}, expected an image and .cls")
            break
        if parts["cls"].strip() != str(shard.label).encode():
            problems.append(f"webdataset {key}: class {parts['cls'][:20]!r}, the shard's is {shard.label}")
            break
        if (bad := _check_image(image, f"webdataset {key}")) is not None:
            problems.append(bad)
            break
    return problems


DECODERS = {"parquet": check_parquet, "webdataset": check_webdataset}


def check_shard(sink: ShardSink, shard: Shard, formats: list[str], listed: dict[str, dict]) -> list[str]:
    """Problems of one committed shard (empty: intact). ``listed``: format -> {stem: listing entry}."""
    marker = sink.path(shard.recipe, "_stats", shard.name)
    try:
        stats = json.loads(sink._retry(f"reading {marker}", sink.fs.cat_file, marker))
    except FileNotFoundError:
        return ["marker vanished while verifying"]
    except ValueError as e:
        return [f"marker is not valid JSON ({e})"]
    problems = [f"marker says {k} {stats.get(k)!r}, the plan {want!r}"
                for k, want in (("shard_id", shard.shard_id), ("label", shard.label), ("index", shard.index),
                                ("seed", shard.seed), ("num_images", shard.num_images)) if stats.get(k) != want]
    for kind in formats:
        want = (stats.get("files") or {}).get(kind)
        entry = listed[kind].get(shard.name)
        if want is None:
            problems.append(f"marker records no {kind} file")
            continue
        if entry is None:
            problems.append(f"{kind} file missing")
            continue
        if entry.get("size") is not None and entry["size"] != want["bytes"]:
            problems.append(f"{kind} file is {entry['size']} bytes, the marker says {want['bytes']}")
            continue
        path = sink.path(shard.recipe, kind, shard.name)
        try:
            data = sink._retry(f"reading {path}", sink.fs.cat_file, path)
        except FileNotFoundError:
            problems.append(f"{kind} file missing")
            continue
        if len(data) != want["bytes"]:
            problems.append(f"{kind} file is {len(data)} bytes, the marker says {want['bytes']}")
        elif hashlib.sha256(data).hexdigest() != want["sha256"]:
            problems.append(f"{kind} file's sha256 differs from the marker's")
        problems += [f"{kind}: {p}" for p in DECODERS[kind](data, shard)]
        del data
    return problems


def _listings(sink: ShardSink, recipe: str, formats: list[str]) -> tuple[set[str], dict[str, dict]]:
    done = set(list_folder(sink, f"{sink.root}/{recipe}/_stats", ".json", detail=False))
    listed = {k: list_folder(sink, f"{sink.root}/{recipe}/{k}", SUFFIX[k]) for k in formats}
    return done, listed


def remove_shard(sink: ShardSink, recipe: str, name: str, formats: list[str]) -> None:
    """Un-complete a shard: its marker first (so a crash leaves it merely pending), then its files."""
    for kind in ["_stats", *formats]:
        path = sink.path(recipe, kind, name)
        try:
            if sink.local:
                os.remove(path)
            else:
                sink._retry(f"removing {sink.fs.unstrip_protocol(path)}", sink.fs.rm_file, path)
        except FileNotFoundError:
            pass


def drop_incomplete(plan: Plan, sink: ShardSink, formats: list[str]) -> list[str]:
    """The cheap check of every rerun: committed shards with a format's file missing from its folder's
    listing lose their marker, so that they are made again. One listing per folder, no marker opened.
    Returns the shards dropped (``recipe/shard``)."""
    dropped = []
    for rp in plan.recipes:
        done, listed = _listings(sink, rp.recipe, formats)
        for sid in plan.recipe_range(rp.recipe):
            s = plan.shard(sid)
            if s.name in done and any(s.name not in listed[k] for k in formats):
                remove_shard(sink, s.recipe, s.name, [])
                dropped.append(f"{s.recipe}/{s.name}")
    if dropped and not sink.local:
        sink.fs.invalidate_cache()
    return dropped


def verify(output: str, workers: int = 8, repair: bool = False, plan: Plan | None = None,
           formats: list[str] | None = None) -> dict:
    """Check every planned shard of the run at ``output`` (its plan from run.json unless given); with
    ``repair``, un-complete the bad ones. ``ok`` is true when every shard is present and intact."""
    if plan is None:
        plan, formats, _, sink = load_plan(output)
    else:
        sink = ShardSink(output, formats)
    bad, missing, recipes = [], [], []
    counts: dict[str, collections.Counter] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rp in plan.recipes:
            done, listed = _listings(sink, rp.recipe, formats)
            counts[rp.recipe] = collections.Counter()
            shards = (plan.shard(sid) for sid in plan.recipe_range(rp.recipe))
            in_flight = {}
            while True:  # a bounded window of shards in flight: memory flat whatever the plan's size
                for s in itertools.islice(shards, max(0, 4 * workers - len(in_flight))):
                    if s.name not in done:
                        missing.append(f"{s.recipe}/{s.name}")
                    else:
                        in_flight[pool.submit(check_shard, sink, s, formats, listed)] = s
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for f in finished:
                    s = in_flight.pop(f)
                    problems = f.result()
                    if problems:
                        bad.append({"shard": f"{s.recipe}/{s.name}", "shard_id": s.shard_id, "problems": problems})
                    else:
                        counts[rp.recipe][s.class_name] += s.num_images
            want = rp.images_per_class
            short = {plan.class_names[c]: counts[rp.recipe][plan.class_names[c]] for c in plan.labels
                     if counts[rp.recipe][plan.class_names[c]] != want}
            recipes.append({"recipe": rp.recipe, "shards_planned": rp.shards_per_class * len(plan.labels),
                            "images_per_class_planned": want, "classes_short": short})
    bad.sort(key=lambda b: b["shard_id"])
    repaired = []
    if repair:
        for b in bad:
            recipe, name = b["shard"].split("/", 1)
            remove_shard(sink, recipe, name, formats)
            repaired.append(b["shard"])
        if repaired and not sink.local:
            sink.fs.invalidate_cache()
    return {"output": sink.output, "ok": not bad and not missing, "shards_planned": len(plan),
            "shards_intact": len(plan) - len(bad) - len(missing), "bad": bad, "missing": missing,
            "recipes": recipes, "repaired": repaired}


def format_verify(res: dict, show: int = 20) -> str:
    lines = [f"{res['output']}: {res['shards_intact']:,} of {res['shards_planned']:,} planned shards intact"]
    for b in res["bad"]:
        lines.append(f"BAD {b['shard']}: " + "; ".join(b["problems"]))
    if res["missing"]:
        more = len(res["missing"]) - show
        lines.append(f"MISSING {len(res['missing']):,} shards (not complete): " + ", ".join(res["missing"][:show])
                     + (f", ... and {more:,} more" if more > 0 else ""))
    for r in res["recipes"]:
        if r["classes_short"]:
            lines.append(f"{r['recipe']}: classes short of {r['images_per_class_planned']} intact images: "
                         + ", ".join(f"{c} ({n})" for c, n in r["classes_short"].items()))
    if res["repaired"]:
        lines.append(f"repaired: removed the markers and files of {len(res['repaired'])} bad shards; "
                     "`factory run` re-makes them")
    elif res["bad"]:
        lines.append("`factory verify --repair` (or `factory run --verify`) has the next run re-make the bad shards")
    lines.append("OK" if res["ok"] else "FAILED")
    return "\n".join(lines)
